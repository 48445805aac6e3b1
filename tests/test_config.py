"""Config: overrides, and one-sentence errors that name the key (checked before any model loads)."""
from __future__ import annotations

import pytest

from groupwise.config import Config, ConfigError, build_config, load_config, set_dotted


def test_builtin_default_recipe_loads_and_round_trips(tmp_path):
    cfg = load_config()
    assert cfg.model.path == "builtin" and cfg.data.train == "builtin:arithmetic"
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


def test_dotted_overrides_are_typed():
    cfg = load_config(None, ["algorithm.eps_high=0.28", "rollout.num_generations=4", "algorithm.kl.coef=0.01", "model.lora.enabled=true"])
    assert cfg.algorithm.eps_high == 0.28 and cfg.algorithm.resolved_eps_high == 0.28
    assert cfg.rollout.num_generations == 4 and cfg.algorithm.kl.coef == 0.01 and cfg.model.lora.enabled is True
    assert load_config().algorithm.resolved_eps_high == load_config().algorithm.eps_low


def test_set_dotted_creates_sections_and_refuses_descending_into_values():
    raw: dict = {}
    set_dotted(raw, "a.b.c=[1, 2]")
    assert raw == {"a": {"b": {"c": [1, 2]}}}
    with pytest.raises(ConfigError, match="'a.b.c' is a value"):
        set_dotted(raw, "a.b.c.d=1")
    with pytest.raises(ConfigError, match="key.subkey=value"):
        set_dotted(raw, "no_equals_sign")


@pytest.mark.parametrize(
    "override, message",
    [
        ("algorithm.eps_hgh=0.3", "config key 'algorithm.eps_hgh' is unknown; allowed here: advantage,"),
        ("nonsense=1", "config key 'nonsense' is unknown"),
        ("rollout.num_generations=abc", "config key 'rollout.num_generations': input should be a valid integer"),
        ("optimizer.lr=-1", "config key 'optimizer.lr': input should be greater than 0"),
        ("rollout.temperature=0", "config key 'rollout.temperature'"),
        ("rollout.num_generations=1", "rollout.num_generations must be at least 2 for algorithm.advantage 'grpo'"),
        ("algorithm.mini_batches=3", "algorithm.mini_batches (3) must divide the completions per step"),
        ("optimizer.micro_batch_size=7", "optimizer.micro_batch_size (7) must divide the completions per mini-batch"),
        ("algorithm.advantage=nope", "algorithm.advantage 'nope' is unknown; known: batch_std, bnpo, dcpo_sas, dr_grpo"),
        ("algorithm.aggregation=mean", "algorithm.aggregation 'mean' is unknown; known: constant, seq_mean_token_mean"),
        ("algorithm.kl.estimator=k9", "algorithm.kl.estimator 'k9' is unknown; known: abs, k1, k1+, k2, k2+, k3, k3+"),
        ("schedule.warmup_steps=1000", "schedule.warmup_steps (1000) exceeds schedule.steps"),
        ("rewards.accuracy_function=foo", "rewards.accuracy_function 'foo' is not one of rewards.functions"),
        ("data.train=builtin:chess", "data.train 'builtin:chess' is not a built-in task"),
        ("device=tpu", "device 'tpu' is not one of auto, cpu, cuda"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    text = str(info.value)
    assert message in text
    assert "\n" not in text, "one sentence, one line"


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(lst)


def test_a_file_layers_over_schema_defaults(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("rollout:\n  num_generations: 4\n")
    cfg = load_config(f)
    assert cfg.rollout.num_generations == 4
    assert cfg.optimizer.lr == Config().optimizer.lr  # the schema default, not the built-in recipe's


def test_build_config_accepts_a_config():
    cfg = load_config()
    assert build_config(cfg, ["seed=3"]).seed == 3


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["algorithm.advantage=rloo", "algorithm.std_unbiased=false"], "algorithm.std_unbiased does not apply to advantage estimator 'rloo'"),
        (["algorithm.loss_options={delta: 3}"], "algorithm.loss_options.delta does not apply to policy loss 'ppo_clip' (its options: eps_low, eps_high)"),
        (["algorithm.advantage_options={foo: 1}"], "algorithm.advantage_options.foo does not apply to advantage estimator 'grpo'"),
    ],
)
def test_options_that_do_not_apply_to_the_part_are_refused_by_name(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, overrides)


def test_part_options_resolve_from_flat_fields_and_mappings():
    alg = load_config(None, ["algorithm.eps_high=0.28", "algorithm.advantage_options={eps: 0.01}"]).algorithm
    assert alg.loss_kwargs() == {"eps_high": 0.28}, "unset flat fields leave the part's own defaults"
    assert alg.advantage_kwargs() == {"eps": 0.01}
    assert load_config(None, ["algorithm.eps_low=0.3"]).algorithm.loss_kwargs() == {"eps_low": 0.3, "eps_high": 0.3}, "TRL: eps_high follows eps_low"
    assert load_config(None, ["algorithm.advantage=rloo"]).algorithm.advantage_kwargs() == {}
    assert load_config(None, ["algorithm.loss=cispo"]).algorithm.loss_kwargs() == {}, "CISPO keeps its own ε defaults"
