"""Every config key, generated from the schema: `docs/config.md`.

    python -m groupwise.config_reference > docs/config.md

A test fails when the committed page differs from what this prints, so it cannot go stale.
"""
from __future__ import annotations

import sys
import typing
from typing import Any

from pydantic import BaseModel

_HEADER = """# Config reference

Generated from the schema in `groupwise/config.py` by
`python -m groupwise.config_reference > docs/config.md`; do not edit by hand.

A run is configured by one YAML file (sections below) plus `--set key.subkey=value` overrides.
Keys a file leaves out take these defaults; `groupwise train` with no file runs the built-in
recipe (`configs/builtin.yaml`), which sets the numbers that suit the built-in tiny model.
Unknown keys are refused by name.
"""


def _section(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _type_text(annotation: Any) -> str:
    text = repr(annotation) if typing.get_origin(annotation) else getattr(annotation, "__name__", repr(annotation))
    return text.replace("typing.", "").replace("NoneType", "None")


def _default_text(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, list) and value and isinstance(value[0], BaseModel):
            value = [v.model_dump() for v in value]
    else:
        value = field.default
    if value is None:
        return "null"
    return f"`{value!r}`" if not isinstance(value, str) else f"`{value}`"


def _rows(model: type[BaseModel], prefix: str, out: list[str], sections: list[tuple[str, type[BaseModel]]]) -> None:
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        sub = _section(field.annotation)
        if sub is not None:
            sections.append((key, sub))
            continue
        desc = (field.description or "").replace("|", "\\|")
        type_text = _type_text(field.annotation).replace("|", "\\|")   # a pipe would end the table cell
        out.append(f"| `{key}` | `{type_text}` | {_default_text(field).replace('|', chr(92) + '|')} | {desc} |")


def config_markdown() -> str:
    from groupwise.config import Config

    out = [_HEADER]
    top: list[str] = []
    sections: list[tuple[str, type[BaseModel]]] = []
    _rows(Config, "", top, sections)
    out += ["\n## Top level\n", "| key | type | default | meaning |", "|---|---|---|---|", *top]
    while sections:
        key, model = sections.pop(0)
        rows: list[str] = []
        nested: list[tuple[str, type[BaseModel]]] = []
        _rows(model, f"{key}.", rows, nested)
        doc = (model.__doc__ or "").strip()
        out.append(f"\n## `{key}`\n")
        if doc:
            out.append(doc + "\n")
        if rows:
            out += ["| key | type | default | meaning |", "|---|---|---|---|", *rows]
        sections = nested + sections   # a sub-section right after its parent
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(config_markdown())
