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
from groupwise.config import load_config

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


def test_evaluation_means_from_sums_by_hand():
    from groupwise.evaluation import evaluation_means

    sums = {"num_prompts": 4.0, "greedy_correct": 1.0, "greedy_reward_sum": 1.5, "greedy_reward_count": 3.0, "greedy_length_sum": 22.0,
            "pass_sum": 2.5, "sampled_correct": 5.0, "sampled_reward_sum": 0.0, "sampled_reward_count": 0.0}
    means = evaluation_means(sums, k=2)
    assert means == {"num_prompts": 4.0, "greedy_accuracy": 0.25, "greedy_reward": 0.5, "greedy_length": 5.5,
                     "pass@2": 0.625, "mean@2": 0.625, "sampled_reward": means["sampled_reward"]}
    assert means["sampled_reward"] != means["sampled_reward"], "no completion has a reward: NaN, not 0"
    assert evaluation_means({}, k=2) == {} and evaluation_means({"num_prompts": 0.0}) == {}


def test_evaluation_shares_add_up_to_the_whole_held_out_set(tmp_path):
    """What torchrun's ranks do: each evaluates a contiguous share (sampled rows offset as in one
    call); the summed shares give the figures of one process evaluating everything."""
    from groupwise import distributed as dist
    from groupwise.evaluation import evaluate, evaluation_means, evaluation_sums
    from groupwise.trainer import Trainer

    trainer = Trainer(load_config(None, small_overrides(tmp_path, **{"eval.max_new_tokens": 6})))
    prompts, k = trainer.eval_prompts[:7], 3
    args = (trainer.engine, trainer.tokenizer)
    whole = evaluate(*args, prompts, trainer.rewards, trainer.config, k=k, seed=5)
    shares = [evaluation_sums(*args, prompts[a:b], trainer.rewards, trainer.config, k=k, seed=5, row_offset=a) for a, b in ((0, 3), (3, 7))]
    summed = {key: shares[0][key] + shares[1][key] for key in shares[0]}
    assert evaluation_means(summed, k) == whole
    assert whole["num_prompts"] == 7 and set(whole) >= {"greedy_accuracy", "pass@3", "mean@3", "sampled_reward"}
    wrong = evaluation_sums(*args, prompts[3:7], trainer.rewards, trainer.config, k=k, seed=5, row_offset=0)
    assert wrong != shares[1], "the offset matters: a share drawn as rows 0… samples other completions"
    assert dist.all_reduce_sums(shares[0], trainer.dist, trainer.device) == shares[0]   # one process: the identity
