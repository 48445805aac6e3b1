"""One typed schema for a whole run: YAML in, dotted `--set` overrides, validated before any model loads.

Every error is one sentence that names the key and what is allowed (`ConfigError`); the CLI exits 2.
Words follow TRL / verl where they exist (num_generations, eps_low/eps_high, num_iterations, …).
"""
from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config that cannot run: the message names the key and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class LoraConfig(_Section):
    """LoRA adapters through peft; only the adapter is trained and saved."""

    enabled: bool = Field(False, description="train LoRA adapters instead of all weights; the KL reference is then the base model (adapter off)")
    r: int = Field(16, ge=1, description="adapter rank")
    alpha: float = Field(32.0, gt=0, description="scaling numerator (lora_alpha)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="lora_dropout; set to 0 in the policy (as all dropout is): dropout would make π_θ ≠ π_old for equal weights, so a non-zero value only logs a warning")
    target_modules: list[str] | Literal["all-linear"] = Field("all-linear", description="module names to adapt, or all-linear (every linear layer but the output head)")


class ModelConfig(_Section):
    path: str = Field("builtin", description="'builtin' (the tiny arithmetic model shipped in the package) or a local Hugging Face model directory")
    tokenizer_path: str | None = Field(None, description="tokenizer directory; default: the model directory")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="weights' dtype; float32 on CPU (bf16 matmuls are far slower there), bfloat16 on GPU")
    attn_implementation: Literal["sdpa", "eager"] | None = Field(None, description="transformers attention kernel; default: the model's own choice")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass: less memory, about one more forward of compute")
    padding_free: bool = Field(False, description="log-probs and the update run on one packed row per micro-batch: no pad tokens (groupwise.model.packing)")
    shared_prefix: bool = Field(False, description="Prefix Grouper: each group's prompt is encoded once in the update and the old/reference log-probs, and the prefix all of a micro-batch's prompts share (e.g. a system prompt) once per micro-batch (implies padding_free)")
    keep_head_probs_mb: float = Field(512.0, ge=0.0, description="in the update, keep the LM head's softmax over a micro-batch's completion tokens (tokens × vocab × 4 bytes) for the backward pass when it takes at most this many MiB, instead of recomputing the logits (one head matmul fewer); 0 = always recompute")
    lora: LoraConfig = LoraConfig()
    check_memory: bool = Field(True, description="before loading the model, estimate its per-device memory (groupwise.memory_plan, as `groupwise plan` prints) and refuse a run that cannot fit; false = skip the check")

    @property
    def sequence_layout(self) -> str:
        """How the update lays rows out: padded, packed, or shared_prefix."""
        return "shared_prefix" if self.shared_prefix else "packed" if self.padding_free else "padded"


class DataConfig(_Section):
    train: str = Field("builtin:arithmetic", description="'builtin:arithmetic' or a path: .jsonl, .json, .parquet, or a datasets.save_to_disk directory")
    eval: str | None = Field(None, description="held-out prompts; default: the built-in held-out split when train is built in")
    format: Literal["auto", "jsonl", "json", "parquet", "hf_disk"] = Field("auto", description="file format; auto: from the extension (a directory: datasets.save_to_disk)")
    split: str | None = Field(None, description="split of a DatasetDict directory to train on; default: train")
    eval_split: str | None = Field(None, description="split of data.eval (a DatasetDict directory) to evaluate on")
    prompt_column: str = Field("prompt", description="column holding the prompt text or chat messages (after column_map)")
    column_map: dict[str, str] = Field(default_factory=dict, description="dataset column → our column, e.g. {question: prompt, solution: answer}")
    chat_template: Literal["auto"] | bool = Field("auto", description="auto: apply the tokenizer's chat template when it has one; true: require it; false: plain text")
    system_prompt: str | None = Field(None, description="a system message prepended to chat prompts")
    max_prompt_length: int | None = Field(None, ge=1, description="prompts longer than this (in tokens) are left-truncated, as TRL does")
    shuffle: bool = Field(True, description="the uniform sampler walks a fresh seeded permutation each epoch (false: dataset order)")
    sampler: str = Field("uniform", description="which prompts each round uses and how many completions each: uniform, variance_aware (MMR1), vade, knapsack, sec, prioritized, or 'module:factory' (see groupwise.data.samplers)")
    sampler_options: dict[str, Any] = Field(default_factory=dict, description="options of the selected sampler only")
    train_size: int = Field(20000, ge=1, description="built-in task only: number of generated training problems")
    eval_size: int | None = Field(200, ge=1, description="at most this many held-out prompts are used")


class VLLMConfig(_Section):
    """rollout.backend: vllm — a vLLM engine in the trainer's own process (colocated), weights pushed after every update."""

    gpu_memory_utilization: float = Field(0.3, gt=0.0, le=1.0, description="GPU: fraction of device memory vLLM may take (weights + KV cache); the trainer needs the rest")
    kv_cache_gb: float = Field(1.0, gt=0.0, description="CPU: KV-cache space in GiB (VLLM_CPU_KVCACHE_SPACE)")
    max_model_len: int | None = Field(None, ge=1, description="longest prompt + completion vLLM plans for; default: data.max_prompt_length + the longest max_new_tokens when data.max_prompt_length is set, else the model's own limit")
    enforce_eager: bool = Field(True, description="no CUDA graphs / torch.compile: faster start, slower decode")
    sleep_mode: bool = Field(True, description="GPU: free vLLM's weights and KV cache during the update, wake it before the next generation")


class RolloutConfig(_Section):
    backend: Literal["hf", "vllm"] = Field("hf", description="generation backend: hf (our transformers decode loop) or vllm (pip install 'groupwise[vllm]'; colocated)")
    vllm: VLLMConfig = VLLMConfig()
    num_generations: int = Field(8, ge=1, description="G: completions per prompt")
    prompts_per_step: int = Field(16, ge=1, description="prompts per generation round")
    max_new_tokens: int = Field(256, ge=1, description="most tokens generated per completion (TRL max_completion_length); longer ones are truncated")
    temperature: float = Field(1.0, gt=0.0, description="sampling temperature; the update's log-probs use the same temperature")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass; 1.0 = off")
    top_k: int = Field(0, ge=0, description="0 = off")
    max_concurrent_sequences: int | None = Field(None, ge=1, description="most completions decoded at once (micro-groups; Infinite Sampling); default: all")
    kv_cache_budget_mb: float | None = Field(None, gt=0.0, description="also bound the completions decoded at once by their KV cache (each reserves its prompt + max_new_tokens)")
    scheduling: Literal["continuous", "micro_group"] = Field("continuous", description="continuous: a finished completion's slot is refilled at once; micro_group: the next sequences start when all slots are free")
    packed_matmul: bool = Field(True, description="hf backend, float32 on the CPU: decode through weights prepacked once per round for oneDNN (groupwise.rollout.packed_linear): the same products to float32 rounding, 1.2–1.8× faster weight passes; false = plain F.linear")
    fast_decode: bool = Field(True, description="hf backend, float32 on the CPU, a plain Llama or Qwen2 model: decode steps with stacked q/k/v and gate/up products and about half the tensor operations per layer (groupwise.rollout.fast_decode); the same function to float32 rounding; false = the model's own forward")
    length_order: Literal["none", "shortest_first", "longest_first", "longest_then_shortest"] = Field("longest_then_shortest", description="order of the pending queue by each prompt's predicted completion length (mean of its earlier completions); longest_then_shortest: initial fill longest first, refills shortest first (Infinite Sampling)")


class RewardFunctionConfig(_Section):
    name: str = Field(description="a built-in reward name, 'module:function', or 'file.py:function'")
    weight: float = 1.0
    kwargs: dict[str, Any] = Field(default_factory=dict)


def _default_rewards() -> list[RewardFunctionConfig]:
    return [RewardFunctionConfig(name="exact_answer", kwargs={"extract": "full"})]


class RewardsConfig(_Section):
    functions: list[RewardFunctionConfig] = Field(default_factory=_default_rewards, min_length=1, description="reward functions, each {name, weight, kwargs}; the total is their weighted sum (NaN = not applicable)")
    on_error: Literal["raise", "zero"] = Field("raise", description="a reward that raises, times out, returns the wrong count or a non-finite value: raise names it and the sample; zero scores 0 and counts it in reward_errors")
    timeout_s: float | None = Field(300.0, gt=0.0, description="time limit of one reward function's call on one batch; null = none")
    aggregation: str = Field("sum_then_normalize", description="how K rewards become one: sum_then_normalize (weighted sum) or normalize_then_sum (GDPO: z-score each within its group, then sum; pair with algorithm.advantage: batch_std)")
    accuracy_function: str | None = Field(None, description="the reward whose score decides 'correct'; default: the first function")
    correct_threshold: float = Field(1.0, description="a completion is correct when the accuracy function's score ≥ this")


class KLConfig(_Section):
    coef: float = Field(0.0, ge=0.0, description="β (initial β when adaptive); 0 = no reference model is loaded")
    estimator: str = Field("k3", description="k1, k2, k3, abs, or a straight-through k1+, k2+, k3+ (value of k_n, gradient of k2)")
    placement: Literal["loss", "reward"] = Field("loss", description="in the loss per token (GRPO), or subtracted from the reward as a sequence sum (PPO/RLOO style)")
    target: float | None = Field(None, gt=0.0, description="adaptive β toward this KL (Ziegler et al.); null = fixed β")
    horizon: int = Field(10000, ge=1, description="adaptive β: completions over which β moves by at most 20%")


class EntropyControlConfig(_Section):
    """Skywork-OR1 adaptive entropy: raise the bonus while entropy ≤ target, lower it otherwise."""

    target: float | None = Field(None, gt=0.0, description="null = fixed algorithm.entropy_coef")
    delta: float = Field(0.005, gt=0.0, description="step by which the bonus moves per training step")
    coef_min: float = Field(0.0, ge=0.0, description="lower bound of the adaptive bonus")
    coef_max: float = Field(1.0, ge=0.0, description="upper bound of the adaptive bonus")


class GFPOConfig(_Section):
    """GFPO: sample G, train on the k shortest (or most token-efficient) per group (arXiv 2508.09726)."""

    keep: int | None = Field(None, ge=1, description="k kept per group; null = off")
    metric: Literal["length", "token_efficiency"] = Field("length", description="length: keep the k shortest; token_efficiency: the k best reward per token")


class D3SConfig(_Section):
    """D³S down-sampling: samples with the largest advantage variance, tokens with the largest |A|·entropy."""

    samples_per_group: int | None = Field(None, ge=1, description="null = keep every sample")
    token_ratio: float = Field(1.0, gt=0.0, le=1.0, description="fraction of tokens kept by |A|·entropy")


class DynamicSamplingConfig(_Section):
    """DAPO dynamic sampling: train only on groups whose rewards differ (arXiv 2503.14476)."""

    enabled: bool = Field(False, description="keep only groups whose rewards differ, generating further rounds to fill the batch")
    max_rounds: int = Field(4, ge=1, description="generation rounds per step at most (verl max_num_gen_batches); if still short, zero-variance groups fill the batch")


class RolloutCorrectionConfig(_Section):
    """Importance-sampling correction for the sampler–trainer mismatch (TIS / MIS / IcePop): the
    per-token loss is multiplied by w = π_old(trainer) / π_sampler, truncated or masked."""

    level: Literal["auto", "none", "token", "sequence"] = Field("auto", description="auto: sequence with the vllm backend, none with hf (its sampling log-probs are the trainer's own); token: per-token ratio; sequence: exp of the summed log-ratio")
    mode: Literal["truncate", "mask"] = Field("mask", description="truncate: clamp w to [clip_min, clip_max] (TIS); mask: drop tokens / sequences with w outside it (MIS, IcePop)")
    clip_max: float = Field(3.0, gt=0.0, description="C_max (TRL vllm_importance_sampling_clip_max)")
    clip_min: float | None = Field(None, ge=0.0, description="C_min; null: 0 (one-sided)")


class AlgorithmConfig(_Section):
    advantage: str = Field("grpo", description="advantage estimator (see groupwise.algorithms.advantages)")
    advantage_options: dict[str, Any] = Field(default_factory=dict, description="options of the selected estimator only")
    advantage_eps: float = Field(1e-4, gt=0.0, description="ε in (r − mean)/(std + ε)")
    std_unbiased: bool = Field(True, description="Bessel-corrected group std, as TRL, verl and OpenRLHF")
    ratio_level: str = Field("token", description="token, or sequence (GSPO)")
    loss: str = Field("ppo_clip", description="policy surrogate (see groupwise.algorithms.losses)")
    loss_options: dict[str, Any] = Field(default_factory=dict, description="options of the selected surrogate only, e.g. {delta: 4.0}")
    eps_low: float = Field(0.2, gt=0.0, lt=1.0, description="ε of the PPO clip, lower side (TRL epsilon); also the upper side unless eps_high is set")
    eps_high: float | None = Field(None, gt=0.0, description="default: eps_low; DAPO clip-higher uses 0.28")
    aggregation: str = Field("seq_mean_token_mean", description="seq_mean_token_mean, token_mean, seq_mean_token_sum, constant")
    kl: KLConfig = KLConfig()
    entropy_coef: float = Field(0.0, ge=0.0, description="entropy bonus coefficient c_H (−c_H·H in the loss); 0 = off")
    entropy_control: EntropyControlConfig = EntropyControlConfig()
    top_entropy_quantile: float = Field(1.0, gt=0.0, le=1.0, description="ρ of the 80/20 rule: train only on the top-ρ highest-entropy tokens")
    gfpo: GFPOConfig = GFPOConfig()
    d3s: D3SConfig = D3SConfig()
    num_iterations: int = Field(1, ge=1, description="μ: passes over each generation round")
    mini_batches: int = Field(1, ge=1, description="optimizer steps per pass (verl ppo_mini_batch count)")
    mask_truncated_completions: bool = Field(False, description="leave completions that hit max_new_tokens out of the loss (DAPO's overlong filtering)")
    dynamic_sampling: DynamicSamplingConfig = DynamicSamplingConfig()
    shuffle_mini_batches: bool = Field(True, description="shuffle whole groups across mini-batches each pass")
    rollout_correction: RolloutCorrectionConfig = RolloutCorrectionConfig()

    @property
    def resolved_eps_high(self) -> float:
        return self.eps_low if self.eps_high is None else self.eps_high

    def resolved(self, field: str) -> Any:
        """A flat option's effective value (eps_high falls back to eps_low)."""
        return self.resolved_eps_high if field == "eps_high" else getattr(self, field)

    def advantage_kwargs(self) -> dict[str, Any]:
        from groupwise.algorithms import ADVANTAGES
        from groupwise.algorithms.options import FLAT_ADVANTAGE_OPTIONS, resolve_options

        return resolve_options(kind="advantage estimator", name=self.advantage, fn=ADVANTAGES.get(self.advantage),
                               section=self, flat=FLAT_ADVANTAGE_OPTIONS, explicit_key="advantage_options")

    def loss_kwargs(self) -> dict[str, Any]:
        from groupwise.algorithms import POLICY_LOSSES
        from groupwise.algorithms.options import FLAT_LOSS_OPTIONS, resolve_options

        return resolve_options(kind="policy loss", name=self.loss, fn=POLICY_LOSSES.get(self.loss),
                               section=self, flat=FLAT_LOSS_OPTIONS, explicit_key="loss_options")


class ReplayConfig(_Section):
    """RePO (arXiv 2506.09340): past completions of a prompt replayed into its group, trained with the
    PPO ratio against their stored sampling log-probs."""

    per_group: int = Field(0, ge=0, description="replayed completions added to each group; 0 = off (RePO's script: 8)")
    capacity: int = Field(16, ge=1, description="completions kept per prompt (oldest evicted)")
    min_stored: int = Field(1, ge=1, description="replay a prompt only once this many of its completions are stored")
    strategy: str = Field("highest", description="which stored completions: random, recent, highest (reward), max_variance, all")
    advantage: Literal["split", "mixed"] = Field("split", description="split: replayed rows normalized apart from the fresh ones (RePO's default); mixed: one group")


class AdaptiveRolloutConfig(_Section):
    """AR3PO (arXiv 2509.25808): more samples only for prompts still unsolved, and reuse of a past correct completion."""

    stages: int = Field(1, ge=1, description="sampling stages; after each, prompts with no correct completion get per_stage more; 1 = off")
    per_stage: int | None = Field(None, ge=1, description="completions added per stage; default rollout.num_generations")
    reuse_correct: bool = Field(False, description="a group that ends all wrong gets a past correct completion of its prompt (counted in its statistics, not trained on)")


class HintsConfig(_Section):
    """Scaf-GRPO (arXiv 2510.19807): tiered in-prompt hints for prompts whose groups keep failing."""

    column: str | None = Field(None, description="dataset column with a hint, a list of hints (abstract → concrete) or {knowledge, planning, solution}; null = off")
    patience: int = Field(1, ge=1, description="all-wrong groups in a row before the next hint level")
    warmup_steps: int = Field(50, ge=0, description="no hints before this step (Scaf-GRPO's guidance-exemption period)")
    max_level: int | None = Field(None, ge=0, description="use at most this many hint levels per prompt; null = all in the column")
    template: str = Field("\n\nHint: {hint}", description="appended to the prompt; {hint} and {tier}")


class SelfExplanationConfig(_Section):
    """ExPO (arXiv 2507.02834): an explanation sampled with the answer in view, trained as a positive under the plain prompt."""

    enabled: bool = Field(False, description="sample a self-explanation for failed prompts and train it as a positive")
    answer_column: str = Field("answer", description="column holding the ground-truth answer shown to the policy")
    coef: float = Field(0.04, gt=0.0, description="β of the added β·log π(explanation | plain prompt) term")
    template: str = Field("\n\nThe correct final answer is {answer}. Explain step by step how to reach this answer.",
                          description="appended to the prompt; {answer}")
    all_wrong_only: bool = Field(True, description="explain only prompts whose group was all wrong")


class TeacherConfig(_Section):
    """LUFFY (arXiv 2504.14945) / AMPO (arXiv 2510.02227): reference solutions as off-policy rows of all-wrong groups."""

    column: str | None = Field(None, description="dataset column with a reference solution (or a list: several teachers); null = off")
    gamma: float = Field(0.1, gt=0.0, description="policy shaping f(p) = p / (p + γ) of teacher tokens")
    max_per_group: int = Field(1, ge=1, description="teacher solutions added to one group at most")
    all_wrong_only: bool = Field(True, description="AMPO's guidance on demand: only groups with no correct completion")


class GuidanceConfig(_Section):
    """Replay, reuse and help on failure: rows added to a step's groups besides the fresh samples."""

    replay: ReplayConfig = ReplayConfig()
    adaptive_rollout: AdaptiveRolloutConfig = AdaptiveRolloutConfig()
    hints: HintsConfig = HintsConfig()
    self_explanation: SelfExplanationConfig = SelfExplanationConfig()
    teacher: TeacherConfig = TeacherConfig()


class OptimizerConfig(_Section):
    name: Literal["adamw"] = Field("adamw", description="optimizer (torch AdamW)")
    lr: float = Field(1e-6, gt=0.0, description="peak learning rate")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW (β1, β2)")
    eps: float = Field(1e-8, gt=0.0, description="AdamW ε")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW decoupled weight decay")
    max_grad_norm: float | None = Field(1.0, gt=0.0, description="null = no clipping")
    micro_batch_size: int | None = Field(None, ge=1, description="completions per forward/backward (gradient accumulation); default: the whole mini-batch")


class ScheduleConfig(_Section):
    steps: int = Field(100, ge=1, description="training steps (generation rounds)")
    warmup_steps: int = Field(0, ge=0, description="in training steps")
    lr_scheduler: Literal["constant", "cosine", "linear"] = Field("constant", description="learning-rate shape after warm-up")
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="cosine / linear decay floor as a fraction of optimizer.lr")


class DistributedConfig(_Section):
    """Used under torchrun (WORLD_SIZE > 1): each rank generates its share of the groups."""

    strategy: Literal["fsdp2", "ddp"] = Field("fsdp2", description="fsdp2: parameters, gradients and optimizer state sharded (fully_shard per decoder layer); ddp: replicated, gradients all-reduced")
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="process-group backend; auto: nccl on CUDA, gloo on CPU")
    timeout_s: float = Field(1800.0, gt=0.0, description="collective timeout")


class LoggingConfig(_Section):
    progress: Literal["auto", "rich", "plain", "none"] = Field("auto", description="progress display: auto (rich on a terminal, plain otherwise), rich, plain, none")
    samples_every: int = Field(10, ge=0, description="write sample completions every N steps; 0 = never")
    num_samples: int = Field(4, ge=1, description="completions written each time samples are logged")
    tensorboard: bool = Field(False, description="also write TensorBoard event files to RUN_DIR/tensorboard")


class CheckpointConfig(_Section):
    every: int = Field(0, ge=0, description="save every N steps; 0 = only at the end")
    keep_last: int | None = Field(2, ge=1, description="null = keep all")
    save_final: bool = Field(True, description="save a checkpoint after the last step")


class EvalConfig(_Section):
    before_and_after: bool = Field(True, description="held-out greedy accuracy before and after training")
    every: int = Field(0, ge=0, description="also every N steps; 0 = never")
    k: int = Field(8, ge=1, description="samples per prompt for pass@k / mean@k in `groupwise eval`")
    temperature: float = Field(1.0, gt=0.0, description="sampling temperature for pass@k / mean@k (greedy accuracy ignores it)")
    max_new_tokens: int | None = Field(None, ge=1, description="default: rollout.max_new_tokens")


class Config(_Section):
    seed: int = Field(0, description="seeds Python, NumPy and torch; every step's sampling and shuffling derive from it, so a resumed run repeats exactly")
    run_dir: str | None = Field(None, description="default: runs/<date-time>")
    device: str = Field("auto", description="auto (cuda when present), cpu, cuda, cuda:N")
    threads: int | None = Field(None, ge=1, description="torch CPU threads; default: torch's")
    retain_cpu_memory: bool = Field(True, description="on the CPU, keep freed tensor memory in the process for the next step instead of returning it to the OS and page-faulting it back (glibc malloc: no mmap, no trimming; groupwise.cpu_memory): the process holds its peak footprint, as a GPU caching allocator does")
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    rollout: RolloutConfig = RolloutConfig()
    rewards: RewardsConfig = RewardsConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    guidance: GuidanceConfig = GuidanceConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    logging: LoggingConfig = LoggingConfig()
    distributed: DistributedConfig = DistributedConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        _check_consistency(self)
        return self

    @property
    def completions_per_step(self) -> int:
        return self.rollout.prompts_per_step * self.rollout.num_generations

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _check_consistency(cfg: Config) -> None:
    """Cross-field rules; each raises ValueError naming the key (pydantic turns it into ConfigError)."""
    from groupwise.algorithms import AGGREGATIONS, ADVANTAGES, POLICY_LOSSES, RATIO_LEVELS, needs_groups

    alg, roll = cfg.algorithm, cfg.rollout
    for key, registry, name in (
        ("algorithm.advantage", ADVANTAGES, alg.advantage),
        ("algorithm.loss", POLICY_LOSSES, alg.loss),
        ("algorithm.ratio_level", RATIO_LEVELS, alg.ratio_level),
        ("algorithm.aggregation", AGGREGATIONS, alg.aggregation),
    ):
        if name not in registry and ":" not in name:
            raise ValueError(f"{key} '{name}' is unknown; known: {', '.join(registry.names())}")
    from groupwise.algorithms.compat import incompatibility

    reason = incompatibility(advantage=alg.advantage, ratio_level=alg.ratio_level, loss=alg.loss, aggregation=alg.aggregation)
    if reason:
        raise ValueError(reason)
    if ":" not in alg.advantage:
        alg.advantage_kwargs()
    if ":" not in alg.loss:
        alg.loss_kwargs()
    if needs_groups(alg.advantage) and roll.num_generations < 2:
        raise ValueError(
            f"rollout.num_generations must be at least 2 for algorithm.advantage '{alg.advantage}' "
            f"(a group of one has no baseline), got {roll.num_generations}"
        )
    n = cfg.completions_per_step
    if n % alg.mini_batches:
        raise ValueError(
            f"algorithm.mini_batches ({alg.mini_batches}) must divide the completions per step "
            f"(rollout.prompts_per_step × rollout.num_generations = {n})"
        )
    if alg.mini_batches > roll.prompts_per_step:
        raise ValueError(f"algorithm.mini_batches ({alg.mini_batches}) exceeds rollout.prompts_per_step ({roll.prompts_per_step}): "
                         "a mini-batch holds whole groups")
    mini = n // alg.mini_batches
    mb = cfg.optimizer.micro_batch_size
    from groupwise.algorithms import POLICY_LOSSES
    from groupwise.algorithms.options import takes_group_id

    if alg.loss in POLICY_LOSSES and takes_group_id(POLICY_LOSSES.get(alg.loss)):
        g = roll.num_generations
        for key, size in (("completions per mini-batch", mini), ("optimizer.micro_batch_size", mb)):
            if size is not None and size % g:
                raise ValueError(f"algorithm.loss '{alg.loss}' compares the completions of a question, so {key} ({size}) "
                                 f"must be a multiple of rollout.num_generations ({g})")
    if mb is not None and mini % mb:
        raise ValueError(
            f"optimizer.micro_batch_size ({mb}) must divide the completions per mini-batch ({mini} = "
            f"{n} completions per step / algorithm.mini_batches {alg.mini_batches})"
        )
    if cfg.schedule.warmup_steps > cfg.schedule.steps:
        raise ValueError(f"schedule.warmup_steps ({cfg.schedule.warmup_steps}) exceeds schedule.steps ({cfg.schedule.steps})")
    from groupwise.algorithms import KL_ESTIMATORS

    if alg.kl.estimator not in KL_ESTIMATORS:
        raise ValueError(f"algorithm.kl.estimator '{alg.kl.estimator}' is unknown; known: {', '.join(KL_ESTIMATORS.names())}")
    for key, k in (("algorithm.gfpo.keep", alg.gfpo.keep), ("algorithm.d3s.samples_per_group", alg.d3s.samples_per_group)):
        if k is not None and k >= roll.num_generations:
            raise ValueError(f"{key} ({k}) must be smaller than rollout.num_generations ({roll.num_generations}): it keeps a subset of each group")
    ec = alg.entropy_control
    if ec.target is not None and ec.coef_min > ec.coef_max:
        raise ValueError(f"algorithm.entropy_control.coef_min ({ec.coef_min}) exceeds coef_max ({ec.coef_max})")
    names = [f.name for f in cfg.rewards.functions]
    if cfg.rewards.accuracy_function is not None and cfg.rewards.accuracy_function not in names:
        raise ValueError(f"rewards.accuracy_function '{cfg.rewards.accuracy_function}' is not one of rewards.functions: {', '.join(names)}")
    from groupwise.algorithms.reward_aggregation import REWARD_AGGREGATIONS

    if cfg.rewards.aggregation not in REWARD_AGGREGATIONS:
        raise ValueError(f"rewards.aggregation '{cfg.rewards.aggregation}' is unknown; known: {', '.join(REWARD_AGGREGATIONS.names())}")
    from groupwise.data.replay import _STRATEGIES

    gd = cfg.guidance
    if gd.replay.strategy not in _STRATEGIES:
        raise ValueError(f"guidance.replay.strategy '{gd.replay.strategy}' is unknown; known: {', '.join(sorted(_STRATEGIES))}")
    if gd.adaptive_rollout.stages > 1 and alg.dynamic_sampling.enabled:
        raise ValueError("guidance.adaptive_rollout.stages > 1 and algorithm.dynamic_sampling.enabled are two ways to fill groups; choose one")
    if cfg.rewards.aggregation != "sum_then_normalize" and (gd.replay.per_group or gd.adaptive_rollout.reuse_correct):
        raise ValueError(f"rewards.aggregation '{cfg.rewards.aggregation}' needs every reward function's score of every row, "
                         "but replayed and reused rows keep only their total; use sum_then_normalize with guidance.replay / reuse_correct")
    for key, template, field in (("guidance.hints.template", gd.hints.template, "hint"),
                                 ("guidance.self_explanation.template", gd.self_explanation.template, "answer")):
        if "{" + field + "}" not in template:
            raise ValueError(f"{key} must contain {{{field}}}")
    from groupwise.data.samplers import SAMPLERS, check_sampler_options

    if cfg.data.sampler not in SAMPLERS and ":" not in cfg.data.sampler:
        raise ValueError(f"data.sampler '{cfg.data.sampler}' is unknown; known: {', '.join(SAMPLERS.names())}")
    if cfg.data.sampler in SAMPLERS:
        check_sampler_options(cfg.data.sampler, cfg.data.sampler_options)
    if cfg.data.train.startswith("builtin:") and cfg.data.train != "builtin:arithmetic":
        raise ValueError(f"data.train '{cfg.data.train}' is not a built-in task; known: builtin:arithmetic")
    dev = cfg.device
    if not (dev in ("auto", "cpu", "cuda") or dev.startswith("cuda:")):
        raise ValueError(f"device '{dev}' is not one of auto, cpu, cuda, cuda:N")


# ----------------------------------------------------------------------------------------------
# Loading: YAML + dotted overrides → Config, with one-sentence errors
# ----------------------------------------------------------------------------------------------

def _describe(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return list(model.model_fields)


def _format_validation_error(err: ValidationError) -> str:
    """The first problem as one sentence naming the dotted key."""
    e = err.errors()[0]
    loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    key = _describe(loc)
    kind = e["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(loc)
        hint = f"; allowed here: {', '.join(allowed)}" if allowed else ""
        return f"config key '{key}' is unknown{hint}"
    if kind == "value_error":
        return str(e["msg"]).removeprefix("Value error, ")
    value = e.get("input")
    shown = repr(value) if not isinstance(value, dict) else "a mapping"
    return f"config key '{key}': {e['msg'][0].lower() + e['msg'][1:]} (got {shown})"


def set_dotted(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (numbers, bools, lists)."""
    if "=" not in assignment:
        raise ConfigError(f"override '{assignment}' must look like key.subkey=value")
    key, value_text = assignment.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{assignment}' has an empty key")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else ""
    except yaml.YAMLError:
        value = value_text
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override '{key}': '{'.'.join(parts[: i + 1])}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def load_raw(path: str | Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{p}' does not exist")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{p}' is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file '{p}' must hold a mapping of sections, got {type(raw).__name__}")
    return raw


def build_config(raw: dict[str, Any] | Config | None = None, overrides: list[str] | None = None) -> Config:
    """Validate a raw mapping (plus `key=value` overrides) into a Config or raise ConfigError."""
    if isinstance(raw, Config):
        raw = raw.model_dump(mode="json")
    data = dict(raw or {})
    for assignment in overrides or []:
        set_dotted(data, assignment)
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e)) from None


def builtin_config_path() -> Path:
    """The packaged recipe that `groupwise train` runs with no config file."""
    return Path(__file__).resolve().parent / "configs" / "builtin.yaml"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (none: the built-in default recipe), apply `key=value` overrides, validate.

    Keys a file leaves out take the schema's defaults, which suit a real model (TRL-like);
    the built-in recipe sets the numbers that suit the tiny built-in model.
    """
    return build_config(load_raw(builtin_config_path() if path is None else path), overrides)


def default_run_dir() -> str:
    return str(Path("runs") / _dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
