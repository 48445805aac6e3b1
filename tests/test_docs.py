"""Generated documentation must match the code."""
from pathlib import Path

from groupwise.algorithms.catalog import methods_markdown
from groupwise.config_reference import config_markdown

ROOT = Path(__file__).resolve().parent.parent


def test_methods_doc_is_not_stale():
    committed = (ROOT / "docs" / "methods.md").read_text()
    assert committed == methods_markdown(), "docs/methods.md is stale: run python -m groupwise.algorithms.catalog > docs/methods.md"


def test_config_doc_is_not_stale():
    committed = (ROOT / "docs" / "config.md").read_text()
    assert committed == config_markdown(), "docs/config.md is stale: run python -m groupwise.config_reference > docs/config.md"


def test_config_doc_lists_every_key():
    from groupwise.config import Config

    text = config_markdown()
    for section, field in Config.model_fields.items():
        sub = field.annotation
        names = [f"{section}.{k}" for k in sub.model_fields] if isinstance(sub, type) and hasattr(sub, "model_fields") else [section]
        for name in names:
            assert f"`{name}`" in text or f"## `{name}`" in text, name


def test_every_registered_part_names_its_paper_and_formula():
    from groupwise.algorithms import ADVANTAGES, AGGREGATIONS, POLICY_LOSSES, RATIO_LEVELS

    for registry in (ADVANTAGES, RATIO_LEVELS, POLICY_LOSSES, AGGREGATIONS):
        for name, fn in registry.items():
            doc = fn.__doc__ or ""
            assert "arXiv" in doc or "Paper" in doc or "verl" in doc, f"{registry.kind} '{name}' names no paper"
            assert "=" in doc, f"{registry.kind} '{name}' writes no formula"


def test_every_config_key_says_what_it_means():
    blank = [line.split("`")[1] for line in config_markdown().splitlines() if line.startswith("| `") and line.rstrip().endswith("|  |")]
    assert not blank, f"config keys without a description: {', '.join(blank)}"
