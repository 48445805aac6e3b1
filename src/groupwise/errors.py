"""The errors that mean "bad input": the CLI prints their one sentence and exits 2."""
from groupwise.config import ConfigError
from groupwise.data.datasets import DataError
from groupwise.model.loading import ModelLoadError
from groupwise.registry import UnknownPartError
from groupwise.rewards import RewardError

USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, DataError, ModelLoadError, RewardError, UnknownPartError)


def _late() -> None:
    global USER_ERRORS
    from groupwise.trainer import RunDirError

    USER_ERRORS = (*USER_ERRORS, RunDirError)


_late()
