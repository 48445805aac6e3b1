"""`groupwise eval`: evaluate a run's newest checkpoint, or the model a config names."""
from __future__ import annotations

from pathlib import Path

from groupwise.config import ConfigError, load_config


def run_eval(target: str | None, overrides: list[str], k: int | None) -> dict:
    from groupwise import checkpoint as ckpt
    from groupwise.data.sources import load_eval_prompts
    from groupwise.evaluation import evaluate
    from groupwise.model.loading import load_policy, load_tokenizer, resolve_device
    from groupwise.rewards import RewardRunner
    from groupwise.rollout import rollout_engine

    latest = None
    if target and Path(target).is_dir():
        run_dir = Path(target)
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"'{run_dir}' is not a groupwise run directory (no config.yaml)")
        latest = ckpt.latest_checkpoint(run_dir)
        if latest is None:
            raise ConfigError(f"run directory '{run_dir}' has no complete checkpoint to evaluate")
        config = load_config(run_dir / "config.yaml", overrides)
    else:
        config = load_config(target, overrides)

    prompts = load_eval_prompts(config.data)
    if not prompts:
        raise ConfigError("there are no held-out prompts to evaluate: set data.eval to a dataset path")
    runner = RewardRunner(config.rewards.functions, on_error=config.rewards.on_error, timeout_s=config.rewards.timeout_s)
    device = resolve_device(config.device)
    tokenizer = load_tokenizer(config.model)
    model = load_policy(config.model, device)       # the base (plus an empty adapter under LoRA)
    if latest is not None:
        ckpt.load_model_weights(model, latest)      # then the trained weights or adapter
    model.eval()
    runner.bind(device=device, model=model, tokenizer=tokenizer)
    engine = rollout_engine(model, tokenizer, config)
    results = evaluate(engine, tokenizer, prompts, runner, config, k=config.eval.k if k is None else k, seed=config.seed)
    return {"model": str(latest or config.model.path), **results}
