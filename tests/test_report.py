"""`groupwise report`: report.png and a self-contained report.html for one or several runs."""
from __future__ import annotations

import base64
import json
import re
import shutil
import struct
import subprocess

import numpy as np
import pytest

from conftest import small_overrides
from groupwise.cli import main
from groupwise.report import _smooth, final_figures, load_run


def write_run(path, records, config=None):
    """A run directory with the given metrics.jsonl records (and a config.yaml when asked)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if config is not None:
        import yaml

        (path / "config.yaml").write_text(yaml.safe_dump(config))
    return path


def full_record(step: int, **override) -> dict:
    """Every metric the report draws, with values that are easy to average by hand."""
    r = {"step": step, "reward/mean": step / 100, "accuracy": step / 200, "entropy": 1.0 - step / 100, "kl": step / 1000,
         "clip_ratio/low": 0.001, "clip_ratio/high": step / 400, "completion_length/mean": 10.0 + step,
         "completion_length/min": 2.0, "completion_length/max": 20.0 + step, "truncation_rate": 0.25,
         "frac_reward_zero_std": 0.5, "time/generation": 0.5, "time/scoring": 0.1, "time/prepare": 0.05,
         "time/update": 0.3, "time/step": 1.0}
    r.update(override)
    return r


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def two_runs(tmp_path):
    """'alpha': 20 steps (final window: steps 19–20), entropy null at step 20, eval at 10 and 20.
    'beta': 7 steps (final window: step 7 alone), no KL, no eval."""
    alpha = [full_record(s) for s in range(1, 21)]
    alpha[-1]["entropy"] = None
    alpha[9]["eval/greedy_accuracy"], alpha[19]["eval/greedy_accuracy"] = 0.4, 0.55
    beta = [{k: v for k, v in full_record(s, **{"time/step": 2.0}).items() if k != "kl"} for s in range(1, 8)]
    cfg = {"seed": 3, "algorithm": {"advantage": "grpo", "loss": "ppo_clip", "eps_low": 0.2, "eps_high": 0.28, "kl": {"coef": 0.04}},
           "rollout": {"num_generations": 8}}
    return write_run(tmp_path / "alpha", alpha, cfg), write_run(tmp_path / "beta", beta)


def test_final_figures_are_tail_means_and_the_last_eval(two_runs):
    alpha, beta = (final_figures(load_run(p)) for p in two_runs)
    assert alpha["reward"] == pytest.approx((0.19 + 0.20) / 2)            # mean of steps 19 and 20
    assert alpha["entropy"] == pytest.approx(1.0 - 0.19)                   # step 20 is null: step 19 alone
    assert alpha["KL"] == pytest.approx((0.019 + 0.020) / 2)
    assert alpha["clip high"] == pytest.approx((19 / 400 + 20 / 400) / 2)
    assert alpha["length"] == pytest.approx(29.5)
    assert alpha["held-out acc."] == 0.55                                  # the last evaluation
    assert beta["reward"] == pytest.approx(0.07) and beta["s / step"] == 2.0  # 7 steps: the last one alone
    assert beta["KL"] is None and beta["held-out acc."] is None


def test_report_of_two_runs_writes_a_png_and_a_self_contained_page(two_runs, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["report", *map(str, two_runs), "--out", str(out)]) == 0
    assert "report.html" in capsys.readouterr().out
    png = (out / "report.png").read_bytes()
    width, height = png_size(png)
    assert width >= 1000 and height >= 800
    page = (out / "report.html").read_text()
    assert "alpha" in page and "beta" in page
    assert "advantage grpo, loss ppo_clip, ε 0.2/0.28, β 0.04, G 8, seed 3" in page
    assert not re.search(r"<script|<link|https?://|src=\"(?!data:)", page)  # nothing fetched, nothing run
    embedded = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert embedded and png_size(base64.b64decode(embedded.group(1)))[0] >= 1000
    rows = {m.group(1): m.group(2) for m in re.finditer(r"</span>(alpha|beta)</td>(.*?)</tr>", page)}
    # alpha: last step 20, window 19–20, reward 0.195, accuracy 0.0975, held-out 0.55, KL 0.0195, entropy 0.81, …
    assert rows["alpha"].startswith("<td>20</td><td>19–20</td><td>0.195</td><td>0.0975</td><td>0.55</td><td>0.0195</td><td>0.81</td>")
    assert rows["beta"].startswith("<td>7</td><td>7</td><td>0.07</td><td>0.035</td><td>–</td><td>–</td><td>0.93</td>")
    assert rows["beta"].endswith("<td>2</td>")  # s / step
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.png"]  # no temporary file left


def test_one_run_reports_into_its_own_directory_several_into_the_current_one(two_runs, tmp_path, monkeypatch):
    alpha, beta = two_runs
    assert main(["report", str(alpha)]) == 0
    assert (alpha / "report.png").is_file() and (alpha / "report.html").is_file()
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert main(["report", str(alpha), str(beta)]) == 0
    assert (here / "report.png").is_file() and (here / "report.html").is_file()


def test_missing_metrics_and_nulls_are_tolerated(tmp_path):
    sparse = write_run(tmp_path / "sparse", [{"step": s, "reward/mean": None if s in (3, 4) else s / 10} for s in range(1, 9)])
    kl_only = write_run(tmp_path / "kl_only", [{"step": 1, "kl": 0.1}, {"step": 2, "kl": None}, {"step": 3, "kl": "n/a"}])
    nothing = write_run(tmp_path / "nothing", [{"step": 1}, {"step": 2, "note": "text"}])
    all_null = write_run(tmp_path / "all_null", [{"step": s, "reward/mean": None, "time/step": None} for s in (1, 2)])
    out = tmp_path / "out"
    assert main(["report", str(sparse), str(kl_only), str(nothing), str(all_null), "--out", str(out)]) == 0
    assert png_size((out / "report.png").read_bytes())[0] > 500
    page = (out / "report.html").read_text()
    assert all(name in page for name in ("sparse", "kl_only", "nothing", "all_null"))
    assert final_figures(load_run(sparse))["reward"] == pytest.approx(0.8)
    assert final_figures(load_run(all_null))["reward"] is None
    assert main(["report", str(nothing), "--out", str(tmp_path / "empty")]) == 0  # no plottable metric at all


def test_a_step_logged_twice_keeps_the_later_line_and_same_named_runs_are_told_apart(tmp_path):
    a = write_run(tmp_path / "x" / "run", [{"step": 1, "reward/mean": 0.1}, {"step": 2, "reward/mean": 0.2}, {"step": 2, "reward/mean": 0.3}])
    b = write_run(tmp_path / "y" / "run", [{"step": 1, "reward/mean": 0.5}])
    assert load_run(a).last("reward/mean") == 0.3 and len(load_run(a).records) == 2
    out = tmp_path / "out"
    assert main(["report", str(a), str(b), "--out", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "x/run" in page and "y/run" in page


@pytest.mark.parametrize("content, message", [
    (None, "is not a run directory: {m} does not exist"),
    ("", "{m} is empty: the run has logged no step yet"),
    ("\n\n", "{m} is empty"),
    ('{"step": 1, "reward/mean": 0.1}\n{"step": 2, "reward/mean": 0.2}\n{"step": 3, "rew\n', "{m} line 3 is not valid JSON"),
    ('{"step": 1}\n[1, 2]\n', "{m} line 2 is not a metrics record"),
    ('{"reward/mean": 0.1}\n', "{m} line 1 is not a metrics record"),
    ('{"step": "1"}\n', "{m} line 1 is not a metrics record"),
])
def test_bad_input_exits_2_with_one_sentence_and_writes_nothing(tmp_path, capsys, two_runs, content, message):
    bad = tmp_path / "bad"
    bad.mkdir()
    if content is not None:
        (bad / "metrics.jsonl").write_text(content)
    out = tmp_path / "out"
    assert main(["report", str(two_runs[0]), str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("groupwise: error: ") and err.count("\n") == 1
    assert message.format(m=bad / "metrics.jsonl") in err
    assert not out.exists()


def test_an_unwritable_output_is_a_user_error(two_runs, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert main(["report", str(two_runs[0]), "--out", str(blocker)]) == 2
    assert "cannot write the report into" in capsys.readouterr().err


def test_trailing_mean_keeps_gaps():
    y = np.array([1.0, 3.0, np.nan, 5.0, 7.0])
    s = _smooth(y, 2)
    assert np.isnan(s[2])
    np.testing.assert_allclose(s[[0, 1, 3, 4]], [1.0, 2.0, 5.0, 6.0])  # the NaN counts as no point


def _browser() -> str | None:
    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.mark.skipif(_browser() is None, reason="no headless Chromium on PATH")
def test_headless_chromium_renders_the_page(two_runs, tmp_path):
    from PIL import Image

    out = tmp_path / "out"
    assert main(["report", *map(str, two_runs), "--out", str(out)]) == 0
    shot = tmp_path / "shot.png"
    subprocess.run([_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}",
                    f"--screenshot={shot}", "--window-size=1400,2000", (out / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    with Image.open(shot) as image:
        assert image.size == (1400, 2000)
        colors = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50  # text, tables and the curves, not a blank page


@pytest.mark.slow
def test_compare_writes_the_report_of_the_recipes_it_trained(tmp_path, capsys):
    out = tmp_path / "cmp"
    code = main(["compare", "grpo", "dapo", "--steps", "2", "--out", str(out),
                 *sum((["--set", o] for o in small_overrides(tmp_path / "unused") if not o.startswith(("run_dir", "schedule.steps"))), [])])
    assert code == 0
    assert "report:" in capsys.readouterr().out
    page = (out / "report.html").read_text()
    assert "00-grpo" in page and "01-dapo" in page and "<td>2</td>" in page  # run directories; last step 2
    assert png_size((out / "report.png").read_bytes())[0] >= 1000
