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
`algorithm.loss`, `algorithm.aggregation`, `algorithm.kl.estimator`); give its options in
`algorithm.advantage_options` / `algorithm.loss_options` or the flat fields that map onto them.
"""


def _options_text(fn) -> str:
    opts = part_options(fn)
    if not opts:
        return "none"
    return ", ".join(f"`{k}`" if d is inspect.Parameter.empty else f"`{k}={d!r}`" for k, d in opts.items())


def methods_markdown() -> str:
    from groupwise.algorithms import ADVANTAGES, AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES, RATIO_LEVELS

    sections = [
        ("Advantage estimators", "algorithm.advantage", ADVANTAGES, True),
        ("Ratio levels", "algorithm.ratio_level", RATIO_LEVELS, False),
        ("Policy losses (surrogates)", "algorithm.loss", POLICY_LOSSES, True),
        ("Loss aggregations", "algorithm.aggregation", AGGREGATIONS, False),
        ("KL estimators", "algorithm.kl.estimator", KL_ESTIMATORS, False),
    ]
    out = [_HEADER]
    for title, key, registry, has_options in sections:
        out.append(f"\n## {title} (`{key}`)\n")
        out.append("| name | function |" + (" options |" if has_options else ""))
        out.append("|---|---|" + ("---|" if has_options else ""))
        for name, fn in registry.items():
            row = f"| `{name}` | `{fn.__module__}.{fn.__name__}` |"
            out.append(row + (f" {_options_text(fn)} |" if has_options else ""))
        for name, fn in registry.items():
            doc = inspect.cleandoc(fn.__doc__ or "(undocumented)")
            out.append(f"\n### `{name}`\n\n{doc}\n")
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(methods_markdown())
