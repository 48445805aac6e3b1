"""groupwise: reinforcement learning of language models with GRPO and its family, as small composable parts.

    import groupwise
    result = groupwise.train({"schedule": {"steps": 50}})
"""
from groupwise.config import Config, ConfigError, load_config

__version__ = "0.1.0"


def train(config=None, *, resume: bool = False):
    """Train a policy from a Config, a dict, a YAML path, or nothing (the built-in default)."""
    from groupwise.trainer import train as _train

    return _train(config, resume=resume)


def __getattr__(name: str):
    if name in ("Trainer", "TrainResult"):
        from groupwise import trainer

        return getattr(trainer, name)
    raise AttributeError(name)


__all__ = ["Config", "ConfigError", "Trainer", "TrainResult", "load_config", "train"]
