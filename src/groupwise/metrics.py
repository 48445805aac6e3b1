"""Where a run's numbers go: `metrics.jsonl` (always), `samples.jsonl`, TensorBoard, a progress bar.

(The architecture sketch calls this `logging.py`; it is `metrics.py` so it never shadows the
standard library's `logging` module.)
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; null says "not measured"
    return value


def truncate_jsonl_after_step(path: Path, step: int) -> None:
    """Drop lines of steps > `step` (written after the checkpoint we resume from), atomically."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line torn by a crash
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    os.replace(tmp, path)


class JsonlWriter:
    def __init__(self, path: Path):
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class MetricsLogger:
    """One JSON line per step in metrics.jsonl; TensorBoard scalars when asked."""

    def __init__(self, run_dir: Path, tensorboard: bool = False):
        self.metrics = JsonlWriter(run_dir / "metrics.jsonl")
        self.samples = JsonlWriter(run_dir / "samples.jsonl")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError("logging.tensorboard is on but the 'tensorboard' package is not installed (pip install 'groupwise[tensorboard]')") from e
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.metrics.write({"step": step, **metrics})
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        for s in samples:
            self.samples.write({"step": step, **s})

    def close(self) -> None:
        self.metrics.close()
        self.samples.close()
        if self.tb is not None:
            self.tb.close()


class NullLogger:
    """What ranks other than 0 log to under torchrun: nothing."""

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        pass

    def close(self) -> None:
        pass


def _nanstd(x: torch.Tensor) -> float:
    x = x[~torch.isnan(x)]
    return float(x.std()) if x.numel() > 1 else 0.0


def step_metrics(rollout, scores, rewards, advantages, accuracy_index: int, correct_threshold: float, times: dict[str, float]) -> dict[str, float]:
    """What a step's rollout, scores and advantages say (the update adds its own numbers)."""
    from groupwise.algorithms.filters import zero_variance_groups
    from groupwise.evaluation import correct_mask

    lengths = rollout.completion_lengths.float()
    tokens = float(lengths.sum())
    m: dict[str, float] = {
        "reward/mean": float(torch.nanmean(rewards)),
        "reward/std": _nanstd(rewards),
        "accuracy": float(correct_mask(scores, accuracy_index, correct_threshold).float().mean()),
        "frac_reward_zero_std": float(zero_variance_groups(rewards, rollout.group_id).float().mean()),
        "advantage/mean": float(advantages.mean()),
        "advantage/std": float(advantages.std()) if advantages.numel() > 1 else 0.0,
        "completion_length/mean": float(lengths.mean()),
        "completion_length/min": float(lengths.min()),
        "completion_length/max": float(lengths.max()),
        "truncation_rate": float(rollout.truncated.float().mean()),
        "tokens_generated": tokens,
        "reward_errors": float(scores.num_errors),
    }
    for k, name in enumerate(scores.names):
        m[f"rewards/{name}/mean"] = float(torch.nanmean(scores.values[:, k]))
        m[f"rewards/{name}/std"] = _nanstd(scores.values[:, k])
        if scores.function_errors is not None:
            m[f"rewards/{name}/errors"] = float(scores.function_errors[k])
    m.update({f"time/{k}": v for k, v in times.items()})
    m["tokens_per_second"] = tokens / max(times["generation"], 1e-9)
    return m


def update_metrics(sums: dict[str, float], losses: list[float], grad_norms: list[float], lr: float) -> dict[str, float]:
    """A step's update figures from its per-token sums (over every micro-batch and rank) and its
    optimizer steps' losses and gradient norms: clip fractions, entropy and KL are per trained
    token, the policy loss and loss per optimizer step; the kept fraction is of the tokens before
    token-level masks (80/20, D³S)."""
    tokens = max(sums.get("tokens", 0.0), 1.0)
    low, high = sums.get("clip_low", 0.0), sums.get("clip_high", 0.0)
    out = {
        "loss": sum(losses) / len(losses),
        "policy_loss": sums.get("policy_loss", 0.0) / len(losses),
        "grad_norm": sum(grad_norms) / len(grad_norms),
        "clip_ratio/low": low / tokens,
        "clip_ratio/high": high / tokens,
        "clip_ratio/region": (low + high) / tokens,
        "entropy": sums.get("entropy", 0.0) / tokens,
        "lr": lr,
        "optimizer_steps": float(len(losses)),
        "token_mask/kept_fraction": sums.get("tokens", 0.0) / max(sums.get("tokens_before_token_masks", 0.0), 1.0),
    }
    if "kl" in sums:
        out["kl"] = sums["kl"] / tokens
    return out


def sample_records(rollout, scores, n: int) -> list[dict[str, Any]]:
    """The first n completions with their prompt, per-function rewards and finished flag."""
    out = []
    for row in range(min(n, rollout.num_completions)):
        prompt = rollout.prompt_of_row(row)
        out.append({
            "prompt": prompt.as_reward_input,
            "completion": rollout.completions_text[row],
            "rewards": {name: _none_if_nan(float(scores.values[row, k])) for k, name in enumerate(scores.names)},
            "finished": bool(rollout.finished[row]),
        })
    return out


def _none_if_nan(x: float) -> float | None:
    return None if x != x else x


class Progress:
    """A live bar with reward and accuracy (rich in a terminal, plain lines otherwise)."""

    def __init__(self, mode: str, total: int, start: int = 0):
        if mode == "auto":
            mode = "rich" if sys.stdout.isatty() else "plain"
        self.mode, self.total, self.start = mode, total, start
        self._t0 = time.perf_counter()
        self._bar = None
        if mode == "rich":
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._bar = RichProgress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                TextColumn("reward {task.fields[reward]:.3f}  acc {task.fields[acc]:.1%}  {task.fields[extra]}"),
            )
            self._bar.start()
            self._task = self._bar.add_task("train", total=total, completed=start, reward=float("nan"), acc=float("nan"), extra="")

    def update(self, step: int, reward: float, accuracy: float, extra: str = "") -> None:
        if self.mode == "rich":
            self._bar.update(self._task, completed=step, reward=reward, acc=accuracy, extra=extra)
        elif self.mode == "plain":
            every = max(1, self.total // 20)
            if step % every == 0 or step == self.total:
                elapsed = time.perf_counter() - self._t0
                print(f"step {step}/{self.total}  reward {reward:.3f}  acc {accuracy:.1%}  {extra}  [{elapsed:.0f}s]", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
