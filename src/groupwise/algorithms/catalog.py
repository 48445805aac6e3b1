"""The methods catalogue: `docs/methods.md`, generated from the registries' docstrings.

    python -m groupwise.algorithms.catalog > docs/methods.md

A test fails when the committed file differs from what this prints, so the page cannot go stale.
"""
from __future__ import annotations

import inspect
import sys

from groupwise.algorithms.options import part_options

_HEADER = """# Methods

Generated from the docstrings of the registered parts by
`python -m groupwise.algorithms.catalog > docs/methods.md`; do not edit by hand.
Select a part by its name in the config (`algorithm.advantage`, `algorithm.ratio_level`,
`algorithm.loss`, `algorithm.aggregation`, `algorithm.kl.estimator`, `rewards.aggregation`,
`rewards.functions[].name`, `data.sampler`); give its options in `algorithm.advantage_options` /
`algorithm.loss_options` or the flat fields that map onto them, a reward's in its `kwargs`, and a
sampler's in `data.sampler_options`. Replay, reuse and guidance on failure (RePO, AR3PO, Scaf-GRPO,
ExPO, LUFFY/AMPO) are config sections, not parts: see `guidance:` in `groupwise.config`.
"""


def _options_text(fn) -> str:
    opts = part_options(fn)
    if not opts:
        return "none"
    return ", ".join(f"`{k}`" if d is inspect.Parameter.empty else f"`{k}={d!r}`" for k, d in opts.items())


def _kwargs_text(factory) -> str:
    """A reward factory's parameters: they are the reward's `kwargs` in the config."""
    params = inspect.signature(factory).parameters.values()
    return ", ".join(f"`{p.name}`" if p.default is inspect.Parameter.empty else f"`{p.name}={p.default!r}`" for p in params) or "none"


def methods_markdown() -> str:
    from groupwise.algorithms import ADVANTAGES, AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES, RATIO_LEVELS
    from groupwise.algorithms.reward_aggregation import REWARD_AGGREGATIONS
    from groupwise.data.samplers import SAMPLERS
    from groupwise.rewards import REWARDS

    sections = [
        ("Advantage estimators", "algorithm.advantage", ADVANTAGES, _options_text),
        ("Ratio levels", "algorithm.ratio_level", RATIO_LEVELS, None),
        ("Policy losses (surrogates)", "algorithm.loss", POLICY_LOSSES, _options_text),
        ("Loss aggregations", "algorithm.aggregation", AGGREGATIONS, None),
        ("KL estimators", "algorithm.kl.estimator", KL_ESTIMATORS, None),
        ("Reward aggregations", "rewards.aggregation", REWARD_AGGREGATIONS, None),
        ("Reward functions", "rewards.functions[].name", REWARDS, _kwargs_text),
        ("Samplers", "data.sampler", SAMPLERS, _options_text),
    ]
    out = [_HEADER]
    for title, key, registry, options in sections:
        out.append(f"\n## {title} (`{key}`)\n")
        out.append("| name | function |" + (" options |" if options else ""))
        out.append("|---|---|" + ("---|" if options else ""))
        for name, fn in registry.items():
            row = f"| `{name}` | `{fn.__module__}.{fn.__name__}` |"
            out.append(row + (f" {options(fn)} |" if options else ""))
        for name, fn in registry.items():
            doc = inspect.cleandoc(fn.__doc__ or "(undocumented)")
            out.append(f"\n### `{name}`\n\n{doc}\n")
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(methods_markdown())
