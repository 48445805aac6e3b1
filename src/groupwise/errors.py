"""The errors that mean "bad input": the CLI prints their one sentence and exits 2."""
from groupwise.config import ConfigError
from groupwise.data.datasets import DataError
from groupwise.model.loading import ModelLoadError
from groupwise.registry import UnknownPartError
from groupwise.rewards import RewardError


class RunDirError(ValueError):
    """A run directory that would be overwritten, or cannot be resumed."""


USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, DataError, ModelLoadError, RewardError, UnknownPartError, RunDirError)
