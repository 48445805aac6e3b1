"""`groupwise report RUN_DIR…`: one picture of one or several runs — `report.png` and a self-contained `report.html`.

Panels (each one drawn only when some run logged its metric; a run without it has no line there):
train reward and accuracy (with held-out greedy accuracy when eval ran), KL, entropy, clip
fractions, completion length (mean; a min–max band for one or two runs), truncation,
zero-variance groups, seconds per step and the mean step-time breakdown. Runs are overlaid, one
colour per run. A null value in `metrics.jsonl` (NaN when logged) is a gap in the line.

The table of final figures gives, per run, the mean over the last 10% of its logged steps (at
least one step; the rule `groupwise compare` uses for its train reward), nulls left out; held-out
accuracy is the last evaluation logged. The HTML embeds the figure as a base64 PNG: no script, no
external file, nothing fetched.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

TAIL_FRACTION = 10  # final figures: mean over the last len // TAIL_FRACTION logged steps (at least 1)
SMOOTH_ABOVE = 100  # more points than this: a faint raw line plus a trailing mean of len // 25 points
BAND_MAX_RUNS = 2   # min–max bands (completion length) only up to this many runs: more would hide each other


class ReportError(ValueError):
    """A path that is not a run directory, or a metrics.jsonl that cannot be read."""


@dataclass
class Run:
    """One run directory's metrics: `steps` in order, `records[i]` the metrics logged at `steps[i]`."""

    name: str
    path: Path
    steps: np.ndarray
    records: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)

    def has(self, key: str) -> bool:
        """Whether any step logged a number for `key`."""
        return any(_number(r.get(key)) is not None for r in self.records)

    def series(self, key: str, sparse: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of `key`; null → NaN (a gap). `sparse`: only the steps that logged the key (eval)."""
        rows = [(s, r.get(key)) for s, r in zip(self.steps.tolist(), self.records) if not sparse or key in r]
        x = np.array([s for s, _ in rows], dtype=float)
        y = np.array([_nan(v) for _, v in rows], dtype=float)
        return x, y

    def tail(self) -> slice:
        """The last 10% of logged steps (at least one): the window of the final figures."""
        return slice(len(self.records) - max(1, len(self.records) // TAIL_FRACTION), None)

    def tail_mean(self, key: str) -> float | None:
        """Mean of `key` over `tail()`, nulls left out; None when nothing there."""
        values = [v for r in self.records[self.tail()] if (v := _number(r.get(key))) is not None]
        return sum(values) / len(values) if values else None

    def last(self, key: str) -> float | None:
        """The last number logged for `key` (e.g. the last evaluation)."""
        for r in reversed(self.records):
            if (v := _number(r.get(key))) is not None:
                return v
        return None


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def _nan(v: Any) -> float:
    n = _number(v)
    return math.nan if n is None else n


# ---------------------------------------------------------------- reading

def load_run(path: str | Path, name: str | None = None) -> Run:
    """Read `path/metrics.jsonl`; ReportError (one sentence naming file and line) when it is absent, empty or corrupt."""
    path = Path(path)
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise ReportError(f"'{path}' is not a run directory: {metrics} does not exist")
    try:
        text = metrics.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ReportError(f"cannot read {metrics}: {e}") from e
    by_step: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ReportError(f"{metrics} line {number} is not valid JSON ({e.msg})") from e
        if not isinstance(record, dict) or isinstance(record.get("step"), bool) or not isinstance(record.get("step"), int):
            raise ReportError(f"{metrics} line {number} is not a metrics record (a JSON object with an integer \"step\")")
        by_step[record.pop("step")] = record  # a step logged twice: the later line wins
    if not by_step:
        raise ReportError(f"{metrics} is empty: the run has logged no step yet")
    steps = sorted(by_step)
    return Run(name or path.name, path, np.array(steps), [by_step[s] for s in steps], _read_config(path / "config.yaml"))


def _read_config(path: Path) -> dict[str, Any]:
    """config.yaml as a dict, or {} when absent or unreadable (it only labels the run)."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def config_summary(config: dict[str, Any]) -> str:
    """The recipe in a few words: advantage, loss, clip range, KL coefficient, group size, seed."""
    alg = config.get("algorithm") if isinstance(config.get("algorithm"), dict) else {}
    kl = alg.get("kl") if isinstance(alg.get("kl"), dict) else {}
    rollout = config.get("rollout") if isinstance(config.get("rollout"), dict) else {}
    parts = [("advantage", alg.get("advantage")), ("loss", alg.get("loss")),
             ("ε", alg.get("eps_low") if alg.get("eps_high") in (None, alg.get("eps_low")) else f"{alg.get('eps_low')}/{alg['eps_high']}"),
             ("β", kl.get("coef")), ("G", rollout.get("num_generations")), ("seed", config.get("seed"))]
    return ", ".join(f"{k} {v}" for k, v in parts if v is not None)


def _unique_names(paths: Sequence[Path], names: Sequence[str] | None) -> list[str]:
    """Given names, else directory names; duplicates get their parent folder, then a number."""
    out = list(names) if names else [p.name or str(p) for p in paths]
    if not names:
        counts = {n: out.count(n) for n in out}
        out = [f"{p.parent.name}/{n}" if counts[n] > 1 else n for p, n in zip(paths, out)]
    seen: dict[str, int] = {}
    for i, n in enumerate(out):
        seen[n] = seen.get(n, 0) + 1
        if seen[n] > 1:
            out[i] = f"{n} ({seen[n]})"
    return out


def load_runs(paths: Sequence[str | Path], names: Sequence[str] | None = None) -> list[Run]:
    """Every run, read and checked before anything is drawn or written."""
    if not paths:
        raise ReportError("no run directory given")
    if names is not None and len(names) != len(paths):
        raise ReportError(f"{len(names)} names for {len(paths)} run directories")
    paths = [Path(p) for p in paths]
    return [load_run(p, n) for p, n in zip(paths, _unique_names(paths, names))]


# ---------------------------------------------------------------- what is drawn

@dataclass(frozen=True)
class Line:
    """One metric in a panel; `keys`: alternatives, the first one a run logged is used."""

    keys: tuple[str, ...]
    label: str = ""                       # shown in the panel's own legend when it has several lines
    style: str = "-"
    sparse: bool = False                  # logged every few steps (eval): points joined, not gaps
    band: tuple[str, str] | None = None   # (low, high) keys shaded around the line


@dataclass(frozen=True)
class Panel:
    title: str
    lines: tuple[Line, ...]
    fraction: bool = False                # a fraction: the y axis starts at 0


PANELS: tuple[Panel, ...] = (
    Panel("reward (train batch mean)", (Line(("reward/mean",)),)),
    Panel("accuracy", (Line(("accuracy",), "train batch"), Line(("eval/greedy_accuracy",), "held-out greedy", "--", sparse=True)), fraction=True),
    Panel("KL to the reference policy", (Line(("kl",)),)),
    Panel("entropy (nats / token)", (Line(("entropy",)),)),
    Panel("clipped tokens (fraction)", (Line(("clip_ratio/low",), "low side"), Line(("clip_ratio/high",), "high side", "--")), fraction=True),
    Panel("completion length (tokens)", (Line(("completion_length/mean",), "mean; band: min–max", band=("completion_length/min", "completion_length/max")),)),
    Panel("truncated completions (fraction)", (Line(("truncation_rate", "completions/clipped_ratio"),),), fraction=True),
    Panel("zero-variance groups (fraction)", (Line(("frac_reward_zero_std",),),), fraction=True),
    Panel("seconds per step", (Line(("time/step",)),)),
)
TIME_PREFIX, TIME_TOTAL = "time/", "time/step"
TIME_ORDER = ("generation", "scoring", "prepare", "update")

# Final figures: (column header, keys); "held-out acc." is the last evaluation, the rest tail means.
FINAL_COLUMNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("reward", ("reward/mean",)),
    ("accuracy", ("accuracy",)),
    ("held-out acc.", ("eval/greedy_accuracy",)),
    ("KL", ("kl",)),
    ("entropy", ("entropy",)),
    ("clip low", ("clip_ratio/low",)),
    ("clip high", ("clip_ratio/high",)),
    ("length", ("completion_length/mean",)),
    ("truncated", ("truncation_rate", "completions/clipped_ratio")),
    ("zero-var.", ("frac_reward_zero_std",)),
    ("s / step", (TIME_TOTAL,)),
)
LAST_VALUE_COLUMNS = {"held-out acc."}


def _key(run: Run, keys: Sequence[str]) -> str | None:
    return next((k for k in keys if run.has(k)), None)


def final_figures(run: Run) -> dict[str, float | None]:
    """Column header → the run's final figure (None when it did not log the metric)."""
    out: dict[str, float | None] = {}
    for header, keys in FINAL_COLUMNS:
        key = _key(run, keys)
        out[header] = None if key is None else run.last(key) if header in LAST_VALUE_COLUMNS else run.tail_mean(key)
    return out


def _fmt(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"


def final_table(runs: Sequence[Run]) -> tuple[list[str], list[list[str]]]:
    """Headers and formatted rows of the final-figures table; a column no run logged is left out."""
    figures = [final_figures(r) for r in runs]
    columns = [h for h, _ in FINAL_COLUMNS if any(f[h] is not None for f in figures)]
    rows = []
    for run, fig in zip(runs, figures):
        window = run.steps[run.tail()]
        span = f"{window[0]}" if len(window) == 1 else f"{window[0]}–{window[-1]}"
        rows.append([run.name, str(run.steps[-1]), span, *(_fmt(fig[h]) for h in columns)])
    return ["run", "last step", "mean over steps", *columns], rows


def _time_breakdown(run: Run) -> dict[str, float]:
    """Phase → mean seconds per step over all logged steps; 'other' is the step time the phases leave."""
    names = sorted({k[len(TIME_PREFIX):] for r in run.records for k in r if k.startswith(TIME_PREFIX) and k != TIME_TOTAL},
                   key=lambda n: (TIME_ORDER.index(n) if n in TIME_ORDER else len(TIME_ORDER), n))
    out = {}
    for n in names:
        y = run.series(TIME_PREFIX + n)[1]
        if np.isfinite(y).any():
            out[n] = float(np.nanmean(y))
    total = run.series(TIME_TOTAL)[1]
    if out and np.isfinite(total).any():
        other = float(np.nanmean(total)) - sum(out.values())
        if other > 0.01 * float(np.nanmean(total)):
            out["other"] = other
    return out


# ---------------------------------------------------------------- drawing

def run_colors(n: int) -> list[str]:
    """One colour per run (tab10, tab20 past ten runs), as #rrggbb."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [to_hex(cmap(i % cmap.N)) for i in range(n)]


def _short(name: str, width: int = 28) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over `window` points, NaN-aware; NaN stays NaN (a gap)."""
    ok = ~np.isnan(y)
    csum = np.concatenate([[0.0], np.cumsum(np.where(ok, y, 0.0))])
    count = np.concatenate([[0], np.cumsum(ok)])
    hi = np.arange(1, len(y) + 1)
    lo = np.maximum(0, hi - window)
    n = count[hi] - count[lo]
    out = (csum[hi] - csum[lo]) / np.maximum(n, 1)
    out[~ok | (n == 0)] = np.nan
    return out


def _plot_line(ax, run: Run, line: Line, color: str, band: bool) -> bool:
    key = _key(run, line.keys)
    if key is None:
        return False
    x, y = run.series(key, sparse=line.sparse)
    if band and line.band and all(run.has(k) for k in line.band):
        lo, hi = (run.series(k, sparse=line.sparse)[1] for k in line.band)
        ax.fill_between(x, lo, hi, color=color, alpha=0.1, linewidth=0)
    if line.sparse:
        keep = ~np.isnan(y)
        ax.plot(x[keep], y[keep], line.style, color=color, marker="o", markersize=4, linewidth=1.4)
    elif len(y) > SMOOTH_ABOVE:
        ax.plot(x, y, line.style, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(x, _smooth(y, max(2, len(y) // 25)), line.style, color=color, linewidth=1.8)
    else:
        ax.plot(x, y, line.style, color=color, linewidth=1.6, marker="o" if len(y) <= 15 else None, markersize=3)
    return True


def _draw_panel(ax, panel: Panel, runs: Sequence[Run], colors: Sequence[str]) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    band = len(runs) <= BAND_MAX_RUNS
    drawn = [line for line in panel.lines if [_plot_line(ax, r, line, c, band) for r, c in zip(runs, colors)].count(True)]
    ax.set_title(panel.title, fontsize=11)
    ax.yaxis.get_major_formatter().set_useOffset(False)
    lo, hi = ax.get_ylim()
    if hi - lo < 1e-9 * max(abs(hi), 1.0):  # a constant: a readable range around it, not ±1e-12
        pad = max(0.05 * abs(hi), 0.05)
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel("step", fontsize=9)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3, linewidth=0.6)
    if panel.fraction:  # from 0, with a sliver below so that an all-zero line stays visible
        top = max(ax.get_ylim()[1], 1e-6)
        ax.set_ylim(-0.03 * top, top)
    if len(panel.lines) > 1 or (band and panel.lines[0].band):
        handles = [Line2D([], [], color="#555", linestyle=line.style, marker="o" if line.sparse else None, markersize=4) for line in drawn]
        ax.legend(handles, [line.label for line in drawn], fontsize=8, loc="best", framealpha=0.85)


def _draw_breakdown(ax, runs: Sequence[Run], colors: Sequence[str], breakdowns: Sequence[dict[str, float]]) -> None:
    """One stacked bar per run (its name in its colour), one grey per phase; wide segments carry their seconds."""
    from matplotlib import colormaps

    phases = list(dict.fromkeys(p for b in breakdowns for p in b))
    levels = np.linspace(0.85, 0.3, len(phases)) if len(phases) > 1 else np.array([0.6])
    shades = colormaps["Greys"](levels)
    rows = [(r, c, b) for r, c, b in zip(runs, colors, breakdowns) if b]
    widest = max(sum(b.values()) for _, _, b in rows)
    for j, (_, _, b) in enumerate(rows):
        left = 0.0
        for k, phase in enumerate(phases):
            width = b.get(phase, 0.0)
            ax.barh(j, width, left=left, height=0.6, color=shades[k], edgecolor="white", linewidth=0.8,
                    label=phase if j == 0 else None, hatch="//" if phase == "other" else None)
            if width > 0.08 * widest:
                ax.text(left + width / 2, j, f"{phase}\n{width:.3g}", ha="center", va="center", fontsize=7.5,
                        color="white" if levels[k] > 0.55 else "black")
            left += width
    ax.set_yticks(range(len(rows)), [_short(r.name, 22) for r, _, _ in rows], fontsize=8)
    for tick, (_, color, _) in zip(ax.get_yticklabels(), rows):
        tick.set_color(color)
        tick.set_fontweight("bold")
    ax.invert_yaxis()
    ax.set_title("step time by phase (mean over all steps)", fontsize=11)
    ax.set_xlabel("seconds", fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(axis="x", alpha=0.3, linewidth=0.6)
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)


def _draw_table(ax, runs: Sequence[Run], colors: Sequence[str]) -> None:
    headers, rows = final_table(runs)
    ax.axis("off")
    cells = [[_short(row[0], 30), *row[1:]] for row in rows]
    table = ax.table(cellText=cells, colLabels=headers, loc="upper center", cellLoc="right", colLoc="right")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.auto_set_column_width(list(range(len(headers))))
    table.scale(1.0, 1.35)
    for (i, j), cell in table.get_celld().items():
        cell.set_edgecolor("#ccc")
        if j == 0:
            cell.set_text_props(ha="left")
            cell.PAD = 0.03
        if i == 0:
            cell.set_text_props(fontweight="bold")
            cell.set_facecolor("#f0f0f0")
        elif j == 0:
            cell.set_text_props(color=colors[i - 1], fontweight="bold")
    ax.set_title(f"final figures: mean over the last {100 // TAIL_FRACTION}% of logged steps (at least one); "
                 "held-out acc.: last evaluation", fontsize=10)


def render_png(runs: Sequence[Run], *, table: bool = True, dpi: int = 100) -> bytes:
    """The report figure as PNG bytes: every panel some run has data for, runs overlaid; `table`: final figures below."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    colors = run_colors(len(runs))
    panels = [p for p in PANELS if any(_key(r, line.keys) for r in runs for line in p.lines)]
    breakdowns = [_time_breakdown(r) for r in runs]
    count = len(panels) + (1 if any(breakdowns) else 0)
    ncols = max(1, min(3, count))
    nrows = max(1, math.ceil(count / ncols))
    heights = [3.5] * nrows
    if any(breakdowns) and len(panels) % ncols == 0 and len(panels):  # the bars alone in the last row: as tall as they need
        heights[-1] = min(3.5, 1.2 + 0.45 * len(runs))
    table_height = 0.3 * (len(runs) + 1) + 0.5 if table else 0.0
    fig = Figure(figsize=(5.2 * ncols, sum(heights) + 0.8 + table_height), layout="constrained")
    grid = fig.add_gridspec(nrows + (1 if table else 0), ncols, height_ratios=heights + ([table_height] if table else []))
    axes = [fig.add_subplot(grid[i // ncols, i % ncols]) for i in range(len(panels))]
    if any(breakdowns):  # the last panel, widened over the row's empty slots
        axes.append(fig.add_subplot(grid[len(panels) // ncols, len(panels) % ncols:]))
    for ax, panel in zip(axes, panels):
        _draw_panel(ax, panel, runs, colors)
    if any(breakdowns):
        _draw_breakdown(axes[len(panels)], runs, colors, breakdowns)
    if not count:
        ax = fig.add_subplot(grid[0, 0])
        ax.axis("off")
        ax.text(0.5, 0.5, "no plottable metric in these runs", ha="center", va="center", fontsize=12)
    if table:
        _draw_table(fig.add_subplot(grid[nrows, :]), runs, colors)
    handles = [Line2D([], [], color=c, linewidth=3) for c in colors]
    labels = [_short(r.name, 40) for r in runs]
    room = int(12 * 5.2 * ncols)  # characters across the figure at this font size, about
    widths = [len(label) + 5 for label in labels]  # with the colour sample
    per_row = len(labels) if sum(widths) <= room else max(1, room // max(widths))
    fig.legend(handles, labels, loc="outside upper center", ncol=min(len(runs), per_row), fontsize=11,
               frameon=False, title="runs", title_fontsize=11)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    return buf.getvalue()


# ---------------------------------------------------------------- the page

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; margin: 24px auto; max-width: 1600px;
       padding: 0 16px; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
.note { color: #555; font-size: 0.9em; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; font-size: 0.92em; }
th, td { padding: 4px 10px; border-bottom: 1px solid #ddd; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; } th:first-child, td:first-child { text-align: left; }
td.text, th.text { text-align: left; white-space: normal; }
td:first-child { white-space: normal; max-width: 24em; word-break: break-all; }
.wide { overflow-x: auto; }
.swatch { display: inline-block; width: 12px; height: 12px; border-radius: 2px; margin-right: 6px; vertical-align: -1px; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
""".strip()


def render_html(runs: Sequence[Run], png: bytes | None = None) -> str:
    """A self-contained page: runs, the figure (base64 PNG, no table in it) and the final-figures table."""
    png = render_png(runs, table=False) if png is None else png
    colors = run_colors(len(runs))
    esc = html.escape

    def name_cell(run: Run, color: str) -> str:
        return f'<td><span class="swatch" style="background:{color}"></span>{esc(run.name)}</td>'

    run_rows = "\n".join(
        f"<tr>{name_cell(r, c)}<td class=text>{esc(str(r.path.resolve()))}</td><td class=text>{esc(config_summary(r.config)) or '–'}</td>"
        f"<td>{len(r.records)}</td></tr>" for r, c in zip(runs, colors))
    headers, rows = final_table(runs)
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "\n".join(f"<tr>{name_cell(r, c)}" + "".join(f"<td>{esc(v)}</td>" for v in row[1:]) + "</tr>"
                     for r, c, row in zip(runs, colors, rows))
    title = "groupwise report — " + ", ".join(r.name for r in runs)
    image = base64.b64encode(png).decode("ascii")
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{esc(title)}</title>
<style>
{_CSS}
</style>
</head>
<body>
<h1>groupwise report</h1>
<p class="note">{len(runs)} run{'s' if len(runs) != 1 else ''}, generated {esc(time.strftime('%Y-%m-%d %H:%M:%S'))}.</p>
<h2>Runs</h2>
<table>
<tr><th>run</th><th class=text>directory</th><th class=text>recipe</th><th>steps logged</th></tr>
{run_rows}
</table>
<h2>Final figures</h2>
<div class="wide">
<table>
<tr>{head}</tr>
{body}
</table>
</div>
<p class="note">Each figure is the mean over the last {100 // TAIL_FRACTION}% of the run's logged steps (at least one step;
the "mean over steps" column gives the window), null values left out; "held-out acc." is the last evaluation logged.
"–": the run did not log that metric.</p>
<h2>Curves</h2>
<img src="data:image/png;base64,{image}" alt="training curves of {esc(', '.join(r.name for r in runs))}">
<p class="note">One colour per run. Gaps are steps whose value was not a number. Over {SMOOTH_ABOVE} steps a faint line
shows the raw values and a solid one their trailing mean over 4% of the steps.</p>
</body>
</html>
"""


# ---------------------------------------------------------------- writing

def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write beside `path`, then rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def default_out_dir(run_dirs: Sequence[str | Path]) -> Path:
    """One run: its own directory; several: the current directory."""
    return Path(run_dirs[0]) if len(run_dirs) == 1 else Path.cwd()


def write_report(run_dirs: Sequence[str | Path], out_dir: str | Path | None = None, names: Sequence[str] | None = None) -> tuple[Path, Path]:
    """Read every run, draw, then write `report.png` and `report.html` into `out_dir` (see `default_out_dir`).

    Returns (png path, html path). ReportError, with nothing written, when a run cannot be read.
    """
    runs = load_runs(run_dirs, names)
    out = Path(out_dir) if out_dir is not None else default_out_dir(run_dirs)
    png, page = render_png(runs, table=True), render_html(runs)
    try:
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write_bytes(out / "report.png", png)
        _atomic_write_bytes(out / "report.html", page.encode("utf-8"))
    except OSError as e:
        raise ReportError(f"cannot write the report into '{out}': {e.strerror or e}") from e
    return out / "report.png", out / "report.html"
