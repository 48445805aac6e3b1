"""Exact resume after SIGKILL, and `groupwise eval`."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import torch
from safetensors.torch import load_file

from groupwise.cli import main

from conftest import small_overrides


def _train(run_dir, *extra_args, env_extra=None, steps=4):
    overrides = small_overrides(run_dir, **{"schedule.steps": steps, "checkpoint.every": 2, "checkpoint.keep_last": 5,
                                            "algorithm.num_iterations": 2, "algorithm.mini_batches": 2})
    args = [sys.executable, "-m", "groupwise", "train", *sum((["--set", o] for o in overrides), []), *extra_args]
    env = {**os.environ, "OMP_NUM_THREADS": "2", **(env_extra or {})}
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)


def _final_weights(run_dir, step):
    return load_file(str(run_dir / "checkpoints" / f"step_{step:06d}" / "model" / "model.safetensors"))


def test_sigkill_then_resume_ends_with_identical_parameters(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert _train(straight).returncode == 0

    # Killed with SIGKILL at the start of step 4: step 3 ran but was never checkpointed.
    proc = _train(killed, env_extra={"GROUPWISE_FAULT_KILL_AT_STEP": "4"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step_000002"]
    assert max(json.loads(x)["step"] for x in (killed / "metrics.jsonl").read_text().splitlines()) == 3

    resumed = subprocess.run(
        [sys.executable, "-m", "groupwise", "train", "--resume", str(killed)],
        env={**os.environ, "OMP_NUM_THREADS": "2"}, capture_output=True, text=True, timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = _final_weights(straight, 4), _final_weights(killed, 4)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    steps = [json.loads(x)["step"] for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4], "the lines of the lost step 3 are replaced, not duplicated"
    m_a = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    m_b = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward/mean"] for r in m_a] == [r["reward/mean"] for r in m_b]


def test_an_interrupted_save_is_ignored(tmp_path, small_config):
    from groupwise.checkpoint import latest_checkpoint
    from groupwise.trainer import Trainer

    cfg = small_config(**{"schedule.steps": 2, "checkpoint.every": 1})
    Trainer(cfg).train()
    run = tmp_path / "run"
    torn = run / "checkpoints" / "step_000003.tmp-999"   # what a crash during a save leaves
    torn.mkdir()
    (torn / "trainer_state.json").write_text("{")
    assert latest_checkpoint(run).name == "step_000002"


def test_eval_of_a_run_directory(tmp_path, small_config, capsys):
    from groupwise.trainer import Trainer

    Trainer(small_config()).train()
    out = tmp_path / "eval.json"
    assert main(["eval", str(tmp_path / "run"), "--k", "4", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "greedy_accuracy" in printed and "pass@4" in printed
    results = json.loads(out.read_text())
    assert results["num_prompts"] == 16.0
    assert 0.0 <= results["mean@4"] <= results["pass@4"] <= 1.0
    assert results["model"].endswith("step_000003")


def test_eval_of_the_builtin_model_matches_its_card(capsys):
    from groupwise.model.loading import builtin_model_dir

    card = json.loads((builtin_model_dir() / "builtin_model_card.json").read_text())
    assert main(["eval", "--k", "0", "--set", f"data.eval_size={card['heldout_size']}"]) == 0
    printed = capsys.readouterr().out
    results = json.loads(printed[printed.index("{"):])
    assert abs(results["greedy_accuracy"] - card["greedy_accuracy"]) < 1e-6


def test_eval_errors(tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    assert "not a groupwise run directory" in capsys.readouterr().err
