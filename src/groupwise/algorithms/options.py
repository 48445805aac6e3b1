"""A part's options are its keyword-only parameters; the config is checked against them.

Two ways to set an option: a flat field shared by many parts (`algorithm.eps_high`, like TRL's
`epsilon_high`) or the part's own mapping (`algorithm.loss_options: {delta: 4.0}`). A flat field
reaches the part only when the user set it, so each part keeps its own published defaults
(CISPO's ε_high = 4, GMPO's 0.4); setting `eps_low` alone also sets `eps_high` (TRL's rule).
A flat field the user set, or a mapping key, that the selected part does not take is refused.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

# Parameters every part of a kind receives from the trainer, not from the config.
_RUNTIME = {"ctx", "old_logp", "mask", "group_id"}

# flat config field → option name, per kind of part
FLAT_ADVANTAGE_OPTIONS = {"advantage_eps": "eps", "std_unbiased": "std_unbiased"}
FLAT_LOSS_OPTIONS = {"eps_low": "eps_low", "eps_high": "eps_high"}


def takes_group_id(fn: Callable[..., Any]) -> bool:
    """Whether a surrogate asks for the rows' group ids (then micro-batches must hold whole groups)."""
    return "group_id" in inspect.signature(fn).parameters


def part_options(fn: Callable[..., Any]) -> dict[str, Any]:
    """Option name → default (inspect.Parameter.empty when required) of a registered part."""
    params = inspect.signature(fn).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _RUNTIME}


def resolve_options(
    *,
    kind: str,
    name: str,
    fn: Callable[..., Any],
    section: Any,
    flat: dict[str, str],
    explicit_key: str,
) -> dict[str, Any]:
    """The options to call `fn` with; raises ValueError naming the offending key."""
    takes = part_options(fn)
    known = ", ".join(takes) or "none"
    options: dict[str, Any] = {}
    explicit = section.model_fields_set
    for field, option in flat.items():
        given = field in explicit or (field == "eps_high" and "eps_low" in explicit)
        if not given:
            continue
        if option not in takes:
            raise ValueError(f"algorithm.{field} does not apply to {kind} '{name}' (its options: {known})")
        options[option] = section.resolved(field) if hasattr(section, "resolved") else getattr(section, field)
    for key, value in getattr(section, explicit_key).items():
        if key not in takes:
            raise ValueError(f"algorithm.{explicit_key}.{key} does not apply to {kind} '{name}' (its options: {known})")
        options[key] = value
    missing = [k for k, d in takes.items() if d is inspect.Parameter.empty and k not in options]
    if missing:
        raise ValueError(f"{kind} '{name}' needs algorithm.{explicit_key}.{missing[0]}")
    return options
