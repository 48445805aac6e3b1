"""The training loop. It orchestrates; the math lives in `groupwise.algorithms`.

One step (one generation round):
  1. the sampler picks prompts            4. advantages, then filters
  2. the rollout engine generates groups  5. old / reference log-probs, then μ × mini-batch updates
  3. the reward functions score them      6. metrics, checkpoint
"""
from __future__ import annotations

from contextlib import nullcontext

import logging
import os
import random
import signal
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from groupwise import checkpoint as ckpt
from groupwise.algorithms import ObjectiveParts, StepCounts, compute_advantages, policy_objective
from groupwise.algorithms.options import takes_group_id
from groupwise.algorithms.advantages import AdvantageContext
from groupwise.algorithms.controllers import AdaptiveEntropyController, AdaptiveKLController, FixedKLController, kl_in_reward, token_mean_kl
from groupwise.algorithms.reward_aggregation import aggregate_rewards
from groupwise.algorithms.rollout_correction import resolve_level, rollout_importance_weights
from groupwise.algorithms.filters import (
    d3s_sample_keep, d3s_token_mask, dynamic_sampling_keep, gfpo_keep, mask_truncated_completions, top_entropy_token_mask,
)
from groupwise.config import Config, ConfigError, build_config, default_run_dir, load_config
from groupwise.batching import micro_batch_rows, mini_batch_rows, rank_groups, rank_micro_batches, rank_rows, split_by_group
from groupwise import distributed as dist
from groupwise.data import render_prompt
from groupwise.data.prompt_stats import PromptStats
from groupwise.data.samplers import RoundOutcome, SamplerContext, build_sampler
from groupwise.data.sources import load_eval_prompts, load_train_prompts
from groupwise.errors import RunDirError
from groupwise.guidance import GeneratedRound, Guidance
from groupwise.evaluation import accuracy_index, correct_mask, evaluation_means, evaluation_sums, score_rollout
from groupwise.memory_plan import check_memory_fits
from groupwise.metrics import MetricsLogger, NullLogger, Progress, sample_records, step_metrics, truncate_jsonl_after_step, update_metrics
from groupwise.model.loading import load_policy, load_reference, load_tokenizer, resolve_device, resolve_model_path, trainable_parameters
from groupwise.model.logprobs import completion_logprobs
from groupwise.model.packing import unsupported_reason_for_path
from groupwise.cpu_memory import retain_freed_memory
from groupwise.optim import build_optimizer, build_scheduler
from groupwise.rewards import RewardRunner
from groupwise.rollout import SamplingParams, rollout_engine
from groupwise.types import ROW_ON_POLICY, ROW_REPLAY, ROW_REUSED, Prompt, RolloutBatch, ScoredGroups, TrainBatch, move_tensors

logger = logging.getLogger("groupwise.trainer")


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    eval_before: dict[str, float]
    eval_after: dict[str, float]
    last_metrics: dict[str, float]


def _step_seed(seed: int, step: int, salt: int) -> int:
    # Independent, reproducible streams per (step, purpose): resuming at step s replays exactly.
    return (seed * 1_000_003 + step * 7919 + salt) % (2**63 - 1)


class Trainer:
    def __init__(self, config: Config | dict | str | Path | None = None, *, resume: bool = False):
        if isinstance(config, Config):
            cfg = config
        elif isinstance(config, dict):
            cfg = build_config(config)
        else:
            cfg = load_config(config)  # a YAML path, or None: the built-in default recipe
        self.config = cfg
        # Under torchrun: join the process group first (every rank needs the same run_dir).
        self.dist, self.device = dist.init_distributed(cfg.distributed, resolve_device(cfg.device))
        self.run_dir = Path(dist.broadcast_object(cfg.run_dir or default_run_dir(), self.dist))
        latest = ckpt.latest_checkpoint(self.run_dir) if resume else None
        if resume and latest is None:
            raise RunDirError(f"cannot resume: run directory '{self.run_dir}' holds no complete checkpoint")
        if not resume and (self.run_dir / "metrics.jsonl").exists():
            raise RunDirError(f"run_dir '{self.run_dir}' already holds a run; resume it with --resume {self.run_dir} or choose another run_dir")

        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.retain_cpu_memory and self.device.type == "cpu":
            retain_freed_memory()   # large tensors are freed and re-allocated every step

        # Everything that can fail on bad input is checked before the model is loaded.
        self.train_prompts = load_train_prompts(cfg.data, cfg.seed)
        self.eval_prompts = load_eval_prompts(cfg.data)
        self.rewards = RewardRunner(cfg.rewards.functions, on_error=cfg.rewards.on_error, timeout_s=cfg.rewards.timeout_s)
        self.accuracy_index = accuracy_index(cfg.rewards, self.rewards.names)
        if cfg.rewards.aggregation == "normalize_then_sum" and cfg.algorithm.advantage != "batch_std":
            logger.warning("rewards.aggregation normalize_then_sum with algorithm.advantage %s: GDPO (arXiv 2601.05242) "
                           "normalizes the summed z-scores over the batch, which is algorithm.advantage: batch_std",
                           cfg.algorithm.advantage)

        self.tokenizer = load_tokenizer(cfg.model)
        self.layout = cfg.model.sequence_layout
        if self.layout != "padded" and (why := unsupported_reason_for_path(str(resolve_model_path(cfg.model.path)))):
            field = "model.shared_prefix" if cfg.model.shared_prefix else "model.padding_free"
            raise ConfigError(f"{field}: {why}; set {field}: false")
        if cfg.model.check_memory:
            check_memory_fits(cfg, world_size=self.dist.world_size)   # before any weight is loaded
        self.model = load_policy(cfg.model, self.device)
        if latest is not None:
            ckpt.load_model_weights(self.model, latest)   # whole weights, before they are sharded
        dist.wrap_policy(self.model, self.dist, self.device)
        self.model.train()
        self.ref_model = None
        if cfg.algorithm.kl.coef > 0 and not cfg.model.lora.enabled:
            self.ref_model = load_reference(cfg.model, self.device)
            dist.wrap_policy(self.ref_model, self.dist, self.device)   # FSDP2: sharded too, gathered only for its own pass
        self.rewards.bind(device=self.device, model=self.model, tokenizer=self.tokenizer)  # self-certainty, reward models
        self.engine = rollout_engine(self.model, self.tokenizer, cfg)
        self.optimizer_steps_per_step = cfg.algorithm.num_iterations * cfg.algorithm.mini_batches
        self.optimizer = build_optimizer(trainable_parameters(self.model), cfg.optimizer)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, self.optimizer_steps_per_step)
        self.prompt_stats = PromptStats(len(self.train_prompts))   # what samplers and curricula read
        self.sampler = build_sampler(cfg.data.sampler, SamplerContext(
            num_prompts=len(self.train_prompts), seed=cfg.seed, stats=self.prompt_stats, prompts=self.train_prompts, shuffle=cfg.data.shuffle,
        ), cfg.data.sampler_options)
        self.guidance = Guidance(cfg.guidance, self.train_prompts, self.prompt_stats, self.tokenizer, self.engine.pad_id, cfg.seed)
        self.parts = ObjectiveParts.from_config(cfg.algorithm).with_guidance(cfg.guidance)
        self.correction_level = resolve_level(cfg.algorithm.rollout_correction.level, cfg.rollout.backend)   # TIS / MIS
        self.advantage_options = cfg.algorithm.advantage_kwargs()
        self.advantage_state: dict[str, Any] = {}   # estimators' running statistics (BNPO, DCPO, …)
        kl, ent = cfg.algorithm.kl, cfg.algorithm.entropy_control
        self.kl_controller = AdaptiveKLController(kl.coef, kl.target, kl.horizon) if kl.target else FixedKLController(kl.coef)
        self.entropy_controller = (
            AdaptiveEntropyController(cfg.algorithm.entropy_coef, ent.target, ent.delta, ent.coef_min, ent.coef_max) if ent.target else None
        )
        self.sampling = SamplingParams(
            max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k
        )
        self.step = 0
        self.sampler_draws = 0   # plans drawn so far: a sampler's step (dynamic sampling draws several per step)
        self.eval_before: dict[str, float] = {}

        dist.barrier(self.dist)   # every rank has checked run_dir before rank 0 writes into it
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if latest is not None:
            state = ckpt.load_checkpoint(latest, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler)   # optimizer resharded
            self.step = int(state["step"])
            self.sampler_draws = int(state.get("sampler_draws", self.step))
            self.sampler.load_state_dict({**state["sampler"], **(ckpt.load_tensors(latest, "sampler") or {})})
            if (stats := ckpt.load_tensors(latest, "prompt_stats")) is not None:
                self.prompt_stats.load_state_dict(stats)
            self.guidance.load_state_dict(ckpt.load_tensors(latest, "guidance") or {})
            self.eval_before = state.get("eval_before", {})
            self.advantage_state = state.get("advantage_state", {})
            self.kl_controller.load_state_dict(state["kl_controller"])
            if self.entropy_controller is not None:
                self.entropy_controller.load_state_dict(state["entropy_controller"])
                self.parts.entropy_coef = state["entropy_coef_applied"]
            self.parts.kl_coef = self.kl_controller.coef if cfg.algorithm.kl.placement == "loss" else 0.0
            if self.dist.is_main:
                for name in ("metrics.jsonl", "samples.jsonl"):
                    truncate_jsonl_after_step(self.run_dir / name, self.step)
        if self.dist.is_main:
            ckpt.atomic_write_text(self.run_dir / "config.yaml", cfg.to_yaml())
            self.logger = MetricsLogger(self.run_dir, tensorboard=cfg.logging.tensorboard)
        else:
            self.logger = NullLogger()

    # ------------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        cfg = self.config
        if self.step == 0 and cfg.eval.before_and_after and self.eval_prompts:
            self.eval_before = self.evaluate()
            if self.dist.is_main:
                print(f"held-out greedy accuracy before training: {self.eval_before['greedy_accuracy']:.1%} ({len(self.eval_prompts)} prompts)", flush=True)
        progress = Progress(cfg.logging.progress if self.dist.is_main else "none", cfg.schedule.steps, start=self.step)
        metrics: dict[str, float] = {}
        kill_at = int(os.environ.get("GROUPWISE_FAULT_KILL_AT_STEP", "0"))  # fault injection for the resume test
        try:
            while self.step < cfg.schedule.steps:
                if kill_at and self.step + 1 == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                metrics = self.train_step()
                if cfg.eval.every and self.step % cfg.eval.every == 0 and self.eval_prompts:
                    metrics.update({f"eval/{k}": v for k, v in self.evaluate().items()})
                self.logger.log(self.step, metrics)
                progress.update(self.step, metrics["reward/mean"], metrics["accuracy"], f"len {metrics['completion_length/mean']:.1f}")
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                    self.save_checkpoint()
        finally:
            progress.close()
        if cfg.checkpoint.save_final and not (cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0):
            self.save_checkpoint()
        eval_after = self.evaluate() if cfg.eval.before_and_after and self.eval_prompts else {}
        self.logger.close()
        return TrainResult(self.run_dir, self.step, self.eval_before, eval_after, metrics)

    def evaluate(self, k: int = 0) -> dict[str, float]:
        """Held-out figures; under torchrun each rank evaluates a contiguous share and the sums are added."""
        self.engine.wake_up()
        share = rank_groups([1] * len(self.eval_prompts), self.dist.world_size)[self.dist.rank]
        with dist.gathered_parameters(self.model, self.dist):   # collective: every rank enters, even one with no share
            sums = evaluation_sums(self.engine, self.tokenizer, [self.eval_prompts[i] for i in share], self.rewards, self.config,
                                   k=k, seed=self.config.seed, row_offset=share[0] if share else 0)
        return evaluation_means(dist.all_reduce_sums(sums, self.dist, self.device), k)

    def save_checkpoint(self) -> Path:
        sampler_state = ckpt.split_tensors(self.sampler.state_dict())
        return ckpt.save_checkpoint(
            self.run_dir, self.step, model=self.model, tokenizer=self.tokenizer, optimizer=self.optimizer, scheduler=self.scheduler,
            trainer_state={
                "sampler": sampler_state["json"], "sampler_draws": self.sampler_draws, "eval_before": self.eval_before, "advantage_state": self.advantage_state,
                "kl_controller": self.kl_controller.state_dict(), "entropy_controller": self.entropy_controller.state_dict() if self.entropy_controller else None,
                "entropy_coef_applied": self.parts.entropy_coef,
            },
            tensors={"prompt_stats": self.prompt_stats.state_dict(), "sampler": sampler_state["tensors"], "guidance": self.guidance.state_dict()},
            keep_last=self.config.checkpoint.keep_last, ctx=self.dist,
        )

    # ------------------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """One generation round and its updates; advances `self.step` and returns the step's metrics."""
        cfg, alg = self.config, self.config.algorithm
        t0 = time.perf_counter()

        # 1–3. prompts → groups of completions → scores (more rounds under dynamic sampling)
        collected, collect_metrics = self._collect()
        fresh = collected                          # the on-policy groups: what the step's metrics describe
        known = None                               # stored rewards of replayed / reused rows (NaN: scored now)
        if self.guidance.active:
            correct = correct_mask(collected.scores, self.accuracy_index, cfg.rewards.correct_threshold)
            collected, known, guidance_metrics = self.guidance.augment(
                collected, correct, self.step, self._render, self._generate_scored,
                lambda rows: score_rollout(self.rewards, rows, trainer_state={"step": self.step}))
            collect_metrics.update(guidance_metrics)
        rollout, scores = collected.rollout, collected.scores
        source = rollout.row_source
        rewards = scores.total().to(self.device)   # the weighted sum: what metrics and filters read
        if known is not None:
            rewards = torch.where(torch.isnan(known.to(self.device)), rewards, known.to(self.device, rewards.dtype))
        t1 = time.perf_counter()

        # 4. row filters, old / reference log-probs, KL-in-reward, advantages
        lengths = rollout.completion_lengths.float()
        row_keep = None
        if alg.gfpo.keep:  # GFPO: the estimator sees only the kept subset (others: NaN ⇒ left out, A = 0)
            row_keep = gfpo_keep(rewards, rollout.group_id, lengths, alg.gfpo.keep, alg.gfpo.metric)
        mask = rollout.completion_mask.float()
        if alg.mask_truncated_completions:
            mask = mask_truncated_completions(mask, rollout.finished)
        batch = TrainBatch.of_rollout(rollout, mask, cfg.rollout.max_new_tokens)
        self._behaviour_and_reference_logprobs(batch)
        correction_metrics = self._rollout_correction(batch, rollout, source)
        scored = rewards                          # what the advantage estimator reads
        if cfg.rewards.aggregation != "sum_then_normalize":
            scored = aggregate_rewards(cfg.rewards.aggregation, scores.values.to(self.device), scores.weights, rollout.group_id)
        if alg.kl.coef > 0 and alg.kl.placement == "reward":
            scored = kl_in_reward(scored, batch.old_logprobs, batch.ref_logprobs, batch.completion_mask, self.kl_controller.coef, alg.kl.estimator)
        if row_keep is not None:
            scored = torch.where(row_keep, scored, torch.full_like(scored, float("nan")))
        scored, group_id = self.guidance.estimator_inputs(scored, rollout.group_id, source)   # ExPO, RePO split
        ctx = AdvantageContext(
            lengths=lengths, state=self.advantage_state,
            # `prompt_index` (dataset row) lets estimators keep per-prompt statistics across steps
            columns={**rollout.row_columns(), "prompt_index": [rollout.prompts[g].index for g in rollout.group_id.tolist()]},
        )
        advantages = compute_advantages(alg.advantage, scored, group_id, ctx, **self.advantage_options)
        if alg.d3s.samples_per_group:
            keep = d3s_sample_keep(advantages, rollout.group_id, alg.d3s.samples_per_group)
            row_keep = keep if row_keep is None else row_keep & keep
        reused = (source != ROW_REUSED) if bool((source == ROW_REUSED).any()) else None   # AR3PO: in the statistics, not trained on
        for rows in (ctx.loss_mask, row_keep, reused):  # rows left out of the loss (MC-GRPO pivot, GFPO, D³S, reuse)
            if rows is not None:
                batch.completion_mask = batch.completion_mask * rows.to(batch.completion_mask.dtype).unsqueeze(-1)
        batch.advantages = advantages
        t2 = time.perf_counter()

        # 5. the update, then the adaptive coefficients
        self.engine.sleep()   # vLLM on GPU frees its KV cache and weights for the update
        update = self._update(batch)
        with dist.gathered_parameters(self.model, self.dist):
            self.engine.sync_weights(self.model)   # vLLM: the new weights, in memory; hf: nothing
        t3 = time.perf_counter()
        update.update(self._update_coefficients(update, batch))
        if row_keep is not None:
            update["filtered_fraction"] = float(1.0 - row_keep.float().mean())

        if cfg.logging.samples_every and (self.step + 1) % cfg.logging.samples_every == 0:
            self.logger.log_samples(self.step + 1, sample_records(fresh.rollout, fresh.scores, cfg.logging.num_samples))
        times = {**collect_metrics.pop("times"), "prepare": t2 - t1, "update": t3 - t2, "step": t3 - t0}
        on_policy = source == ROW_ON_POLICY
        metrics = step_metrics(fresh.rollout, fresh.scores, rewards[on_policy], advantages[on_policy], self.accuracy_index,
                               cfg.rewards.correct_threshold, times)
        metrics.update(update)
        metrics.update(collect_metrics)
        metrics.update(correction_metrics)
        metrics["tokens_generated"] += metrics.get("guidance/generated_tokens", 0.0)   # ExPO's explanations are compute too
        metrics.update(ctx.metrics)
        metrics.update(self.prompt_stats.metrics())
        if hasattr(self.sampler, "metrics"):
            metrics.update(self.sampler.metrics())
        metrics.update(self.guidance.metrics())
        metrics.update({f"rollout/{k}": v for k, v in self.engine.last_stats.items()})   # of the last generation round
        self.step += 1
        return metrics

    def _token_mask(self, mb: TrainBatch, entropy: torch.Tensor) -> torch.Tensor:
        """Token-level filters, within the micro-batch: 80/20 high-entropy tokens, D³S |A|·entropy."""
        alg, mask = self.config.algorithm, mb.completion_mask
        if alg.top_entropy_quantile < 1.0:
            mask = top_entropy_token_mask(entropy.detach(), mask, alg.top_entropy_quantile)
        if alg.d3s.token_ratio < 1.0:
            mask = d3s_token_mask(mb.advantages, entropy.detach(), mask, alg.d3s.token_ratio)
        return mask

    def _update_coefficients(self, update: dict[str, float], batch: TrainBatch) -> dict[str, float]:
        """Adaptive β (toward a target KL) and adaptive entropy bonus (toward a target entropy)."""
        alg, out = self.config.algorithm, {}
        if alg.kl.coef > 0:
            kl = update.get("kl")
            if kl is None:  # KL in the reward: measure it on the behaviour policy
                kl = out["kl"] = token_mean_kl(batch.old_logprobs, batch.ref_logprobs, batch.completion_mask, alg.kl.estimator)
            coef = self.kl_controller.update(kl, n_steps=batch.num_rows)
            self.parts.kl_coef = coef if alg.kl.placement == "loss" else 0.0
            out["kl_coef"] = coef
        if self.entropy_controller is not None:
            self.entropy_controller.update(update["entropy"])
            self.parts.entropy_coef = self.entropy_controller.applied_coef(update["entropy"])
            out["entropy_coef"] = self.parts.entropy_coef
        return out

    def _collect(self) -> tuple[ScoredGroups, dict[str, Any]]:
        """Generate and score `prompts_per_step` groups. Under dynamic sampling (DAPO) keep only
        groups whose rewards differ, generating further rounds until the batch is full or
        `max_rounds` is reached; then zero-variance groups fill the rest (shapes stay fixed)."""
        cfg = self.config
        want, ds = cfg.rollout.prompts_per_step, cfg.algorithm.dynamic_sampling
        kept, dropped, n_kept, times = [], [], 0, {"generation": 0.0, "scoring": 0.0}
        extra_metrics: dict[str, float] = {}
        generated = 0.0  # every generated token, discarded rounds included: the honest compute count
        rounds = ds.max_rounds if ds.enabled else 1
        for round_index in range(rounds):
            plan = self.sampler.plan(want, cfg.rollout.num_generations, self.sampler_draws)
            self.sampler_draws += 1
            indices = plan.indices
            prompts = self.guidance.apply_hints([self.train_prompts[i] for i in indices])   # Scaf-GRPO
            seed = _step_seed(cfg.seed, self.step, 1 + 1000 * round_index)
            fresh = self._generate_scored(prompts, plan.group_sizes, seed, times=times)
            part, correct = fresh.scored, fresh.correct
            if cfg.guidance.adaptive_rollout.stages > 1:   # AR3PO: more samples for prompts still unsolved
                part, correct, added = self.guidance.more_stages(part, correct, prompts, self._generate_scored, seed,
                                                                 cfg.rollout.num_generations)
                extra_metrics["adaptive_rollout/extra_completions"] = float(added)
            rollout = part.rollout
            generated += float(rollout.completion_lengths.sum())
            totals = part.scores.total()
            gid = rollout.group_id
            by_group = [split_by_group(v, gid) for v in (totals.tolist(), correct.tolist(), rollout.completions_text)]
            self.prompt_stats.update(indices, by_group[0], by_group[1], self.step)
            self.sampler.update(RoundOutcome(indices, *by_group, step=self.step))
            self.guidance.after_round(indices, by_group[1], self.step)
            if not ds.enabled:
                return part, {"times": times, **extra_metrics}
            informative = dynamic_sampling_keep(totals, rollout.group_id.cpu()).tolist()
            keep = [g for g in range(want) if informative[g]]
            drop = [g for g in range(want) if not informative[g]]
            if keep:
                kept.append(part.select_groups(keep))
            if drop:
                dropped.append(part.select_groups(drop))
            n_kept += len(keep)
            if n_kept >= want:
                break
        merged = ScoredGroups.concatenate(kept + dropped, self.engine.pad_id).select_groups(list(range(want)))
        metrics = {
            "dynamic_sampling/rounds": float(round_index + 1), "dynamic_sampling/kept_fraction": n_kept / (want * (round_index + 1)),
            "tokens_generated": generated, "tokens_per_second": generated / max(times["generation"], 1e-9),
        }
        return merged, {"times": times, **metrics}

    def _render(self, prompt: Prompt) -> str:
        cfg = self.config
        return render_prompt(prompt, self.tokenizer, chat_template=cfg.data.chat_template, system_prompt=cfg.data.system_prompt)

    def _generate_scored(self, prompts: list[Prompt], group_sizes: list[int], seed: int, prompt_texts: list[str] | None = None,
                         times: dict[str, float] | None = None) -> GeneratedRound:
        """Generate groups for `prompts` and score them (on-policy rows)."""
        cfg = self.config
        t0 = time.perf_counter()
        texts = prompt_texts if prompt_texts is not None else [self._render(p) for p in prompts]
        # Under torchrun each rank generates and scores its contiguous share of whole groups.
        mine = rank_groups(group_sizes, self.dist.world_size)[self.dist.rank]
        row_offset = sum(group_sizes[: mine[0]]) if mine else 0
        scored, t1 = None, t0
        self.engine.wake_up()   # vLLM on GPU slept through the last update; otherwise a no-op
        with dist.gathered_parameters(self.model, self.dist):   # collective: every rank enters, even one with no share
            if mine:
                rollout = self.engine.generate([prompts[g] for g in mine], [texts[g] for g in mine], [group_sizes[g] for g in mine],
                                               self.sampling, seed=seed, row_offset=row_offset)
                t1 = time.perf_counter()
                scored = ScoredGroups(rollout, score_rollout(self.rewards, rollout, trainer_state={"step": self.step}))
        if self.dist.enabled:   # every rank gets the whole round, in group order
            parts = [move_tensors(p, self.device) for p in dist.all_gather_objects(move_tensors(scored, "cpu"), self.dist) if p is not None]
            scored = ScoredGroups.concatenate(parts, self.engine.pad_id)
        if times is not None:
            times["generation"] += t1 - t0
            times["scoring"] += time.perf_counter() - t1
        return GeneratedRound(scored, correct_mask(scored.scores, self.accuracy_index, cfg.rewards.correct_threshold))

    def _behaviour_and_reference_logprobs(self, batch: TrainBatch) -> None:
        """π_old is needed only when the policy moves before the last use of the batch (μ > 1 or
        several mini-batches); otherwise the detached current log-probs serve (ratio ≡ 1), as in TRL."""
        kl = self.config.algorithm.kl
        needs_old = (self.optimizer_steps_per_step > 1 or (kl.coef > 0 and kl.placement == "reward")
                     or self.correction_level != "none")   # the IS correction compares π_old with the sampler
        batch.old_logprobs = self._no_grad_logprobs(self.model, batch) if needs_old else None
        batch.ref_logprobs = None
        if self.ref_model is not None:
            batch.ref_logprobs = self._no_grad_logprobs(self.ref_model, batch)
        elif kl.coef > 0:   # LoRA: the reference is the base model, adapter off
            batch.ref_logprobs = self._no_grad_logprobs(self.model, batch, adapter_off=True)

    @torch.no_grad()
    def _no_grad_logprobs(self, model: torch.nn.Module, batch: TrainBatch, adapter_off: bool = False) -> torch.Tensor:
        """`model`'s log-probs of the batch's completions `[N, Tc]`: each rank computes its share of
        rows in micro-batches, with the model's parameters gathered for this pass only; then all-gathered."""
        mine = rank_rows(batch.group_id, self.dist.world_size)[self.dist.rank].to(batch.input_ids.device)
        micro = self.config.optimizer.micro_batch_size or max(int(mine.numel()), 1)
        out = [batch.completion_mask.new_zeros(0, batch.completion_mask.shape[1])]
        with dist.gathered_parameters(model, self.dist), (model.disable_adapter() if adapter_off else nullcontext()):
            for rows in (mine[r] for r in micro_batch_rows(batch.group_id[mine], micro, whole_groups=False)):
                mb = batch.select(rows)
                out.append(completion_logprobs(model, mb.input_ids, mb.attention_mask, mb.completion_mask,
                                               temperature=self.config.rollout.temperature, layout=self.layout, group_id=mb.group_id)[0])
        return dist.gather_rows(torch.cat(out), self.dist, self.device)

    def _rollout_correction(self, batch: TrainBatch, rollout: RolloutBatch, source: torch.Tensor) -> dict[str, float]:
        """Importance weights π_old(trainer) / π_sampler for the sampler–trainer mismatch (vLLM's
        kernels are not the trainer's), into `batch.is_weights`; rows the sampler did not generate
        this step (replayed, teacher, …) get weight 1."""
        if self.correction_level == "none":
            return {}
        c = self.config.algorithm.rollout_correction
        on_policy = (source == ROW_ON_POLICY).to(batch.completion_mask.device)
        mask = batch.completion_mask * on_policy.unsqueeze(-1).to(batch.completion_mask.dtype)
        weights, metrics = rollout_importance_weights(batch.old_logprobs, rollout.sampling_logprobs.to(mask.device), mask,
                                                      self.correction_level, c.mode, c.clip_max, c.clip_min)
        batch.is_weights = torch.where(on_policy.unsqueeze(-1), weights, torch.ones_like(weights))
        return metrics

    def _idle_pass(self, mini_batch: TrainBatch) -> None:
        """A forward/backward on one row with zero weight: gradients unchanged, collectives matched."""
        mb = mini_batch.select(torch.tensor([0], device=self.device))
        logp, _ = completion_logprobs(self.model, mb.input_ids, mb.attention_mask, mb.completion_mask,
                                      temperature=self.config.rollout.temperature, layout=self.layout, group_id=mb.group_id)
        (logp.sum() * 0.0).backward()

    def _update(self, batch: TrainBatch) -> dict[str, float]:
        """μ passes × mini-batches optimizer steps, each accumulating micro-batch gradients."""
        cfg, alg = self.config, self.config.algorithm
        micro = cfg.optimizer.micro_batch_size   # None: each rank's whole share in one pass
        params = trainable_parameters(self.model)
        shuffle = torch.Generator().manual_seed(_step_seed(cfg.seed, self.step, 2))
        sums: dict[str, float] = defaultdict(float)
        grad_norms, losses = [], []
        whole_groups = takes_group_id(self.parts.surrogate)   # DisCO compares a question's completions
        for _ in range(alg.num_iterations):
            generator = shuffle if alg.shuffle_mini_batches and alg.mini_batches > 1 else None   # whole groups are shuffled
            for mini_rows in mini_batch_rows(batch.group_id, alg.mini_batches, generator):
                mini_batch = batch.select(mini_rows.to(self.device))
                # Divisors of the whole mini-batch, whichever rank holds a row: Σ over ranks = one process.
                counts = StepCounts.of(mini_batch.completion_mask, batch.max_completion_length)
                self.optimizer.zero_grad(set_to_none=True)
                step_loss = 0.0
                for rows in rank_micro_batches(mini_batch.group_id, micro, whole_groups, self.dist.world_size, self.dist.rank):
                    if rows is None:   # this rank has fewer micro-batches: a no-op pass keeps FSDP/DDP collectives matched
                        self._idle_pass(mini_batch)
                        continue
                    mb = mini_batch.select(rows.to(self.device))
                    logp, entropy = completion_logprobs(
                        self.model, mb.input_ids, mb.attention_mask, mb.completion_mask,
                        temperature=cfg.rollout.temperature, with_entropy=True, entropy_grad=self.parts.entropy_coef > 0,
                        layout=self.layout, group_id=mb.group_id, keep_head_probs_bytes=int(cfg.model.keep_head_probs_mb * 2**20),
                    )
                    old = mb.old_logprobs if mb.old_logprobs is not None else logp.detach()
                    if mb.behaviour_logprobs is not None:
                        old = torch.where((mb.source == ROW_REPLAY).unsqueeze(-1), mb.behaviour_logprobs, old)
                    mask = self._token_mask(mb, entropy)
                    sums["tokens_before_token_masks"] += float(mb.completion_mask.sum())
                    out = policy_objective(self.parts, logp, old, mb.advantages, mask, counts, ref_logp=mb.ref_logprobs, entropy=entropy,
                                           group_id=mb.group_id, source=mb.source, is_weights=mb.is_weights)
                    # FSDP2 / DDP average gradients over ranks; our loss is already a share of the global sum.
                    (out.loss * self.dist.world_size).backward()
                    step_loss += float(out.loss.detach())
                    for k, v in out.sums.items():
                        sums[k] += v
                dist.reduce_gradients(params, self.dist)   # DDP; FSDP2 has reduced in backward
                max_norm = cfg.optimizer.max_grad_norm or float("inf")
                grad_norms.append(float(torch.nn.utils.clip_grad_norm_(params, max_norm)))
                self.optimizer.step()
                self.scheduler.step()
                losses.append(step_loss)
        if self.dist.enabled:   # metric sums and losses over ranks
            reduced = dist.all_reduce_sums({**sums, **{f"__loss{i}": v for i, v in enumerate(losses)}}, self.dist, self.device)
            losses = [reduced.pop(f"__loss{i}") for i in range(len(losses))]
            sums = defaultdict(float, reduced)
        return update_metrics(sums, losses, grad_norms, float(self.scheduler.get_last_lr()[0]))


def train(config: Config | dict | str | Path | None = None, *, resume: bool = False) -> TrainResult:
    """Train a policy: the Python twin of `groupwise train`."""
    return Trainer(config, resume=resume).train()
