"""Training and held-out prompts as the config names them (a built-in task or a dataset file)."""
from __future__ import annotations

from typing import Any

from groupwise.data.datasets import load_prompts, prompts_from_rows
from groupwise.types import Prompt

BUILTIN_ARITHMETIC = "builtin:arithmetic"


def load_train_prompts(data: Any, seed: int) -> list[Prompt]:
    if data.train == BUILTIN_ARITHMETIC:
        from groupwise.data.arithmetic import train_split

        return prompts_from_rows(train_split(seed, data.train_size), source=BUILTIN_ARITHMETIC)
    return load_prompts(data.train, format=data.format, prompt_column=data.prompt_column, column_map=data.column_map or None, split=data.split)


def load_eval_prompts(data: Any) -> list[Prompt]:
    """The held-out prompts (at most `data.eval_size`), or [] when there are none."""
    if data.eval is None:
        if data.train != BUILTIN_ARITHMETIC:
            return []
        from groupwise.data.arithmetic import heldout_split

        rows = heldout_split()
        return prompts_from_rows(rows[: data.eval_size] if data.eval_size else rows, source="builtin:arithmetic (held-out)")
    return load_prompts(
        data.eval, format=data.format, prompt_column=data.prompt_column, column_map=data.column_map or None,
        split=data.eval_split, limit=data.eval_size,
    )
