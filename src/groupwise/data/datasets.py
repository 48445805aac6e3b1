"""Loading user datasets into `Prompt`s, and rendering a `Prompt` to the text the policy sees.

Sources: JSONL, a JSON list of objects, Parquet, or a directory written by `datasets`'
`save_to_disk`. Everything is local: a missing path is an error, never a hub download.

Every row passes through `prompts_from_rows`, so validation is written once and every
problem is reported as a `DataError` naming the source and the row (or JSONL line).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from groupwise.types import Prompt

__all__ = ["DataError", "load_prompts", "prompts_from_rows", "render_prompt"]

Format = Literal["auto", "jsonl", "json", "parquet", "hf_disk"]
FORMATS = ("jsonl", "json", "parquet", "hf_disk")
ROLES = ("system", "user", "assistant", "tool")
_SUPPORTED = ".jsonl, .json, .parquet, or a directory written by datasets' save_to_disk"


class DataError(ValueError):
    """A dataset that cannot be used; the message names the source and the row or line."""


# ---------------------------------------------------------------------------------------
# Rows → Prompts (all validation lives here)
# ---------------------------------------------------------------------------------------


def prompts_from_rows(
    rows: list[dict[str, Any]],
    *,
    source: str,
    prompt_column: str = "prompt",
    column_map: dict[str, str] | None = None,
    line_numbers: list[int] | None = None,
) -> list[Prompt]:
    """Validate in-memory rows and turn them into `Prompt`s (`Prompt.index` = position in `rows`).

    `source` names the data in error messages. Errors say "row i" (0-based) unless
    `line_numbers` gives each row's 1-based line in a text file, then "line n".
    `column_map` renames columns (source name → our name) before anything else.
    """
    if not rows:
        raise DataError(f"{source}: the dataset is empty (no rows)")

    def where(i: int) -> str:
        return f"{source}, line {line_numbers[i]}" if line_numbers is not None else f"{source}, row {i}"

    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{where(i)}: expected an object of columns, got {_describe(row)}")

    column_map = dict(column_map or {})
    if column_map:
        _check_column_map(rows, column_map, source)

    sources = [src for src, dst in column_map.items() if dst == prompt_column]
    label = f"prompt column '{prompt_column}'" + (f" (mapped from '{sources[0]}')" if sources else "")
    prompts = []
    for i, row in enumerate(rows):
        if column_map:
            renamed = {column_map.get(k, k): v for k, v in row.items()}
            if len(renamed) < len(row):
                clash = sorted(n for n in renamed if [column_map.get(k, k) for k in row].count(n) > 1)
                raise DataError(f"{where(i)}: column_map gives two columns the name {clash[0]!r}")
            row = renamed
        if prompt_column not in row:
            raise DataError(
                f"{where(i)}: no {label} (columns: {_names(row)}); set prompt_column or column_map"
            )
        value = row[prompt_column]
        columns = {k: v for k, v in row.items() if k != prompt_column}
        if isinstance(value, str):
            if not value.strip():
                raise DataError(f"{where(i)}: {label} is an empty string")
            prompts.append(Prompt(text=value, messages=None, columns=columns, index=i))
        elif isinstance(value, list):
            messages = _check_messages(value, f"{where(i)}: {label}")
            prompts.append(Prompt(text=None, messages=messages, columns=columns, index=i))
        else:
            raise DataError(
                f"{where(i)}: {label} must be a string or a list of chat messages, got {_describe(value)}"
            )
    return prompts


def _check_column_map(rows: list[dict[str, Any]], column_map: dict[str, str], source: str) -> None:
    """Every mapped source column exists in at least one row; else list the dataset's columns."""
    missing = [src for src in column_map if not any(src in row for row in rows)]
    if missing:
        present: dict[str, None] = {}
        for row in rows:
            present.update(dict.fromkeys(row))
        raise DataError(
            f"{source}: column_map names column(s) {', '.join(repr(m) for m in missing)} that the "
            f"dataset does not have (columns: {_names(present)})"
        )


def _check_messages(value: list[Any], where: str) -> list[dict[str, Any]]:
    """A non-empty list of {"role", "content"} dicts with known roles; None-valued extras dropped.

    Arrow-backed data (Parquet, `datasets`) gives every message every struct field, with None
    where a message lacks it (e.g. `tool_calls`); dropping those keeps chat templates' `is
    defined` tests honest.
    """
    if not value:
        raise DataError(f"{where} is an empty list of chat messages")
    messages = []
    for j, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise DataError(f"{where}, message {j}: expected an object with 'role' and 'content', got {_describe(msg)}")
        msg = {k: v for k, v in msg.items() if v is not None or k in ("role", "content")}
        role = msg.get("role")
        if role not in ROLES:
            problem = "has no 'role'" if role is None else f"has role {role!r}"
            raise DataError(f"{where}, message {j} {problem} (expected one of: {', '.join(ROLES)})")
        content = msg.get("content")
        if not isinstance(content, (str, list)) and not (content is None and msg.get("tool_calls")):
            problem = "has no 'content'" if content is None else f"has 'content' {_describe(content)}"
            raise DataError(f"{where}, message {j} {problem} (expected a string or a list of content parts)")
        messages.append(msg)
    return messages


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _names(keys: Any) -> str:
    return ", ".join(keys) or "none"


# ---------------------------------------------------------------------------------------
# Files → rows
# ---------------------------------------------------------------------------------------


def load_prompts(
    path: str | Path,
    *,
    format: Format = "auto",
    prompt_column: str = "prompt",
    column_map: dict[str, str] | None = None,
    split: str | None = None,
    limit: int | None = None,
) -> list[Prompt]:
    """Load a local dataset as `Prompt`s.

    `format="auto"` picks by the path: `.jsonl`, `.json` (a list of objects), `.parquet`, or a
    directory written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (`hf_disk`).
    `split` chooses a split of a DatasetDict (default "train" when it has one); `limit` keeps
    the first rows only. The prompt column holds text or a list of chat messages; every
    other column is kept in `Prompt.columns` for the reward functions.
    """
    path = Path(path).expanduser()
    source = str(path)
    if not path.exists():
        raise DataError(f"dataset path '{source}' does not exist")
    if limit is not None and limit < 1:
        raise DataError(f"{source}: limit must be at least 1, got {limit}")
    fmt = _detect_format(path) if format == "auto" else format
    if fmt not in FORMATS:
        raise DataError(f"{source}: unknown format {format!r} (expected auto, {', '.join(FORMATS)})")
    if split is not None and fmt != "hf_disk":
        raise DataError(f"{source}: split={split!r} was given but a {fmt} file has no splits")

    line_numbers = None
    if fmt == "jsonl":
        rows, line_numbers = _read_jsonl(path, limit)
    elif fmt == "json":
        rows = _read_json(path, limit)
    elif fmt == "parquet":
        rows = _read_parquet(path, limit)
    else:
        rows = _read_hf_disk(path, split, limit)
    return prompts_from_rows(
        rows, source=source, prompt_column=prompt_column, column_map=column_map, line_numbers=line_numbers
    )


def _detect_format(path: Path) -> str:
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return "hf_disk"
        raise DataError(
            f"{path}: a directory that was not written by datasets' save_to_disk "
            f"(supported: {_SUPPORTED})"
        )
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".parquet"):
        return suffix[1:]
    raise DataError(f"{path}: cannot tell the format from the name (supported: {_SUPPORTED})")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except IsADirectoryError as e:
        raise DataError(f"{path}: is a directory, not a file") from e


def _read_jsonl(path: Path, limit: int | None) -> tuple[list[Any], list[int]]:
    rows: list[Any] = []
    line_numbers: list[int] = []
    for n, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {n}: invalid JSON ({e.msg} at column {e.colno})") from e
        line_numbers.append(n)
        if limit is not None and len(rows) >= limit:
            break
    return rows, line_numbers


def _read_json(path: Path, limit: int | None) -> list[Any]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from e
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of objects, got a JSON {type(data).__name__}")
    return data[:limit]


def _read_parquet(path: Path, limit: int | None) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read Parquet file ({e})") from e
    if limit is not None:
        table = table.slice(0, limit)
    return table.to_pylist()


def _read_hf_disk(path: Path, split: str | None, limit: int | None) -> list[dict[str, Any]]:
    import datasets

    try:
        data = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as e:
        raise DataError(f"{path}: cannot load a dataset saved with save_to_disk ({e})") from e
    if isinstance(data, datasets.DatasetDict):
        available = ", ".join(data) or "none"
        if split is None:
            if "train" not in data:
                raise DataError(f"{path}: a DatasetDict without a 'train' split; choose one with split= (splits: {available})")
            split = "train"
        if split not in data:
            raise DataError(f"{path}: no split {split!r} (splits: {available})")
        data = data[split]
    elif split is not None:
        raise DataError(f"{path}: split={split!r} was given but the dataset has no splits")
    if limit is not None and limit < len(data):
        data = data.select(range(limit))
    return data.to_list()


# ---------------------------------------------------------------------------------------
# Prompt → text
# ---------------------------------------------------------------------------------------


def render_prompt(
    prompt: Prompt,
    tokenizer: Any,
    *,
    chat_template: Literal["auto"] | bool = "auto",
    system_prompt: str | None = None,
) -> str:
    """The text the tokenizer encodes for generation.

    Chat messages always go through the tokenizer's chat template (with the generation
    prompt). Plain text goes through the template only with `chat_template=True` (as one user
    message); with "auto" or False it is used as is, after `system_prompt + "\\n\\n"` if given.
    A `system_prompt` is prepended to messages unless they already start with a system message.
    """
    if chat_template not in ("auto", True, False):
        raise ValueError(f"chat_template must be 'auto', True or False, got {chat_template!r}")
    has_template = getattr(tokenizer, "chat_template", None) is not None

    if prompt.messages is not None:
        if not has_template:
            raise DataError(
                f"prompt {prompt.index} is a chat conversation but the tokenizer has no chat "
                "template; give plain-text prompts or a tokenizer with a chat template"
            )
        messages = list(prompt.messages)
        if system_prompt is not None and not (messages and messages[0].get("role") == "system"):
            messages.insert(0, {"role": "system", "content": system_prompt})
        return _apply_template(tokenizer, messages)

    text = prompt.text if prompt.text is not None else ""
    if chat_template is True:
        if not has_template:
            raise DataError(
                "chat_template=True but the tokenizer has no chat template; set "
                "chat_template to 'auto' or False, or use a tokenizer with a chat template"
            )
        messages = [{"role": "user", "content": text}]
        if system_prompt is not None:
            messages.insert(0, {"role": "system", "content": system_prompt})
        return _apply_template(tokenizer, messages)
    return text if system_prompt is None else f"{system_prompt}\n\n{text}"


def _apply_template(tokenizer: Any, messages: list[dict[str, Any]]) -> str:
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if not isinstance(rendered, str):  # some versions return a one-element batch
        rendered = rendered[0]
    return rendered
