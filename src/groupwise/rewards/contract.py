"""The reward-function contract (TRL's), how functions are loaded, and how their outputs are checked.

A reward function is called with keyword arguments only::

    fn(prompts=[...], completions=[...], completion_ids=[[...], ...],
       trainer_state={"step": 3}, **columns) -> list[float | None]

- `prompts[i]`: the prompt text, or its chat-message list (TRL conversational style);
- `completions[i]`: the completion text (built-ins also accept a message list and use the last
  message's content);
- `completion_ids[i]`: the completion's token ids, without padding;
- every other dataset column (`answer=[...]`, …), aligned with the completions;
- `trainer_state`: a small dict such as `{"step": 3}` (may be None).

It returns one value per completion: a number, or `None` for "not applicable" (NaN in
`Scores.values`, ignored by `Scores.total`). Functions may be `async def`; all async functions of
one call are awaited concurrently. Sync functions run in the calling thread, because
math-verify's timeouts rely on signals, which only the main thread can receive.

Outputs are validated strictly and never broadcast: a wrong length, a non-number, NaN or ±inf,
or an exception raised inside the function is a `RewardError` naming the function (and the sample
index where there is one). With `on_error="zero"` these scores become 0.0 instead, are counted in
`Scores.num_errors`, and each failing function is logged once.
"""
from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import math
import numbers
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable, Literal, Sequence

import numpy as np
import torch

from groupwise.registry import Registry
from groupwise.types import Scores

logger = logging.getLogger("groupwise.rewards")

OnError = Literal["raise", "zero"]
RewardFn = Callable[..., Any]

#: Keyword arguments the runner passes itself; a dataset column may not use these names.
RESERVED_ARGUMENTS = ("prompts", "completions", "completion_ids", "trainer_state")

_FLOAT32_MAX = float(np.finfo(np.float32).max)


class RewardError(ValueError):
    """A reward function is misconfigured, failed, or returned something outside the contract."""


#: Built-in rewards, registered as *factories*: `REWARDS.get("format")(pattern=...)` is the reward.
REWARDS: Registry[Callable[..., RewardFn]] = Registry("reward function")
register_reward = REWARDS.register


# ----------------------------------------------------------------------------- loading


def load_reward_function(name: str, kwargs: dict[str, Any] | None = None) -> RewardFn:
    """The reward callable that `name` selects.

    - a registered built-in (`exact_answer`, …): its factory is called with `kwargs`;
    - an import path (`pkg.mod:func`, `pkg.mod.func`, `path/to/file.py:func`): the user's function
      itself is the reward; `kwargs`, if any, are bound with `functools.partial`.

    An unknown name raises `UnknownPartError` (a KeyError) listing the built-ins.
    """
    kwargs = dict(kwargs or {})
    obj = REWARDS.get(name)  # built-in factory, imported user object, or UnknownPartError
    if name in REWARDS:
        try:
            inspect.signature(obj).bind(**kwargs)
        except TypeError as e:
            raise RewardError(
                f"built-in reward '{name}' cannot be built with the arguments {sorted(kwargs)}: {e} "
                f"(its parameters: {_parameters(obj)})"
            ) from None
        return obj(**kwargs)
    if not callable(obj):
        raise RewardError(f"reward function '{name}' is a {type(obj).__name__}, not a callable")
    return functools.partial(obj, **kwargs) if kwargs else obj


def _parameters(fn: Callable[..., Any]) -> str:
    params = inspect.signature(fn).parameters.values()
    return ", ".join(str(p.replace(annotation=inspect.Parameter.empty)) for p in params) or "none"


def _callable_name(fn: Callable[..., Any]) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", None) or type(fn).__name__


def _unique(names: Sequence[str]) -> list[str]:
    """`["f", "f", "g"]` → `["f", "f_2", "g"]`."""
    out: list[str] = []
    for name in names:
        candidate, k = name, 2
        while candidate in out or (candidate != name and candidate in names):
            candidate, k = f"{name}_{k}", k + 1
        out.append(candidate)
    return out


# ----------------------------------------------------------------------------- validation


def _as_value_list(name: str, output: Any, n: int) -> list[Any]:
    """The function's output as a Python list of length n, or RewardError."""
    if isinstance(output, (np.ndarray, torch.Tensor)):
        if output.ndim != 1:
            raise RewardError(
                f"reward function '{name}' returned a {output.ndim}-D array of shape {tuple(output.shape)}; "
                f"expected a list with one value per completion"
            )
        output = output.tolist()
    elif not isinstance(output, (list, tuple)):
        raise RewardError(
            f"reward function '{name}' returned a {type(output).__name__}; "
            f"expected a list with one value per completion"
        )
    if len(output) != n:
        raise RewardError(f"reward function '{name}' returned {len(output)} values for {n} completions")
    return list(output)


def _as_float(name: str, index: int, value: Any) -> float:
    """One returned value as a float (None → NaN), or RewardError naming function and sample."""
    if value is None:
        return math.nan
    raw = value
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 0:
        value = value.item()
    if isinstance(value, np.bool_):
        value = bool(value)
    if not isinstance(value, numbers.Real):  # str, complex, list, Decimal, a multi-element tensor, …
        shown = repr(raw) if len(repr(raw)) <= 60 else repr(raw)[:57] + "..."
        raise RewardError(
            f"reward function '{name}' returned a {type(raw).__name__} ({shown}) for sample {index}; "
            f"expected a number (float, int, bool) or None"
        )
    try:
        x = float(value)
    except OverflowError:
        x = math.inf if value > 0 else -math.inf
    if math.isnan(x):
        raise RewardError(
            f"reward function '{name}' returned NaN for sample {index}; return None for 'not applicable'"
        )
    if math.isinf(x) or abs(x) > _FLOAT32_MAX:
        raise RewardError(
            f"reward function '{name}' returned {x:g} for sample {index}; rewards must be finite float32 values"
        )
    return x


def _raised(name: str, error: Exception) -> RewardError:
    if isinstance(error, RewardError):
        message = f"reward function '{name}' failed: {error}"
    else:
        message = f"reward function '{name}' raised {type(error).__name__}: {error}"
        if isinstance(error, TypeError) and "unexpected keyword argument" in str(error):
            message += " (reward functions must accept **kwargs: every dataset column is passed as a keyword)"
    out = RewardError(message)
    out.__cause__ = error
    return out


# ----------------------------------------------------------------------------- running async functions


def _await_all(awaitables: list[Awaitable[Any]]) -> list[Any]:
    """Await all concurrently; each result is the value or the exception it raised."""

    async def gather() -> list[Any]:
        return await asyncio.gather(*awaitables, return_exceptions=True)

    try:
        asyncio.get_running_loop()
    except RuntimeError:  # the usual case: no loop in this thread
        return asyncio.run(gather())
    # Called from inside a running loop (a notebook, an async server): it cannot be re-entered,
    # so the awaitables run in a fresh loop on a helper thread while this thread waits.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="groupwise-rewards") as pool:
        return pool.submit(asyncio.run, gather()).result()


# ----------------------------------------------------------------------------- the runner


class RewardRunner:
    """Calls K reward functions on N completions and returns checked `Scores` ([N, K])."""

    def __init__(self, functions: Sequence[Any], on_error: OnError = "raise"):
        """`functions`: objects with `.name`, `.weight`, `.kwargs` (e.g. `RewardFunctionConfig`)."""
        specs = [(spec.name, load_reward_function(spec.name, getattr(spec, "kwargs", None) or {}), spec.weight)
                 for spec in functions]
        display = [name if name in REWARDS else _callable_name(fn) for name, fn, _ in specs]
        self._setup([s[0] for s in specs], display, [s[1] for s in specs], [s[2] for s in specs], on_error)

    @classmethod
    def from_callables(cls, functions: Sequence[tuple[str, RewardFn, float]], on_error: OnError = "raise") -> "RewardRunner":
        """A runner over already-built callables, given as `(name, function, weight)`."""
        runner = cls.__new__(cls)
        for name, fn, _ in functions:
            if not callable(fn):
                raise RewardError(f"reward function '{name}' is a {type(fn).__name__}, not a callable")
        names = [name for name, _, _ in functions]
        runner._setup(names, names, [f for _, f, _ in functions], [w for _, _, w in functions], on_error)
        return runner

    def _setup(self, specs: list[str], names: list[str], fns: list[RewardFn], weights: list[float], on_error: str) -> None:
        if not fns:
            raise ValueError("RewardRunner needs at least one reward function")
        if on_error not in ("raise", "zero"):
            raise ValueError(f"on_error must be 'raise' or 'zero', not {on_error!r}")
        for name, w in zip(names, weights):
            if not isinstance(w, numbers.Real) or not math.isfinite(float(w)):
                raise ValueError(f"reward function '{name}' has weight {w!r}; weights must be finite numbers")
        self._specs = list(specs)
        self._names = _unique(names)
        self._functions = list(fns)
        self._weights = [float(w) for w in weights]
        self.on_error: OnError = on_error  # type: ignore[assignment]
        self._warned: set[str] = set()

    @property
    def names(self) -> list[str]:
        """One unique name per function: the built-in's name, or the user function's `__name__`."""
        return list(self._names)

    @property
    def weights(self) -> torch.Tensor:
        """[K] float32."""
        return torch.tensor(self._weights, dtype=torch.float32)

    def __len__(self) -> int:
        return len(self._functions)

    def index(self, name: str) -> int:
        """Column of `Scores.values` for a function, by its name or by the spec it was loaded from."""
        if name in self._names:
            return self._names.index(name)
        if name in self._specs:
            return self._specs.index(name)
        raise KeyError(f"no reward function '{name}'; known: {', '.join(self._names)}")

    def score(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Sequence[Sequence[int]],
        columns: dict[str, Sequence[Any]] | None = None,
        trainer_state: dict[str, Any] | None = None,
    ) -> Scores:
        """Call every function on the N completions and validate what each returns."""
        columns = dict(columns or {})
        n = len(completions)
        self._check_inputs(prompts, completion_ids, columns, n)
        if n == 0:
            empty = torch.zeros(0, len(self._functions), dtype=torch.float32)
            return Scores(values=empty, names=self.names, weights=self.weights)

        def kwargs() -> dict[str, Any]:  # fresh lists per call: one function cannot mutate another's input
            return dict(prompts=list(prompts), completions=list(completions), completion_ids=list(completion_ids),
                        trainer_state=trainer_state, **{k: list(v) for k, v in columns.items()})

        outputs: list[Any] = [None] * len(self._functions)
        failed: list[Exception | None] = [None] * len(self._functions)
        pending: dict[int, Awaitable[Any]] = {}
        for k, fn in enumerate(self._functions):  # sync ones run here, in the calling thread
            try:
                out = fn(**kwargs())
            except Exception as e:  # noqa: BLE001 - every failure is reported as a RewardError
                failed[k] = e
                if self.on_error == "raise":
                    for aw in pending.values():  # never leave a coroutine un-awaited
                        getattr(aw, "close", lambda: None)()
                    raise _raised(self._names[k], e) from e
                continue
            if inspect.isawaitable(out):
                pending[k] = out
            else:
                outputs[k] = out
        if pending:
            for k, result in zip(pending, _await_all(list(pending.values()))):
                if isinstance(result, Exception):
                    failed[k] = result
                elif isinstance(result, BaseException):  # KeyboardInterrupt, cancellation
                    raise result
                else:
                    outputs[k] = result

        values = [[0.0] * len(self._functions) for _ in range(n)]  # [N, K]; failures stay 0.0
        num_errors = 0
        for k, name in enumerate(self._names):
            try:
                if failed[k] is not None:
                    raise _raised(name, failed[k]) from failed[k]
                column = _as_value_list(name, outputs[k], n)
            except RewardError as e:
                if self.on_error == "raise":
                    raise
                self._warn_once(name, e)
                num_errors += n
                continue
            for i, v in enumerate(column):
                try:
                    values[i][k] = _as_float(name, i, v)
                except RewardError as e:
                    if self.on_error == "raise":
                        raise
                    self._warn_once(name, e)
                    num_errors += 1
        return Scores(values=torch.tensor(values, dtype=torch.float32), names=self.names,
                      weights=self.weights, num_errors=num_errors)

    @staticmethod
    def _check_inputs(prompts: Sequence[Any], completion_ids: Sequence[Any], columns: dict[str, Sequence[Any]], n: int) -> None:
        if len(prompts) != n or len(completion_ids) != n:
            raise ValueError(f"got {len(prompts)} prompts and {len(completion_ids)} completion_ids for {n} completions; "
                             f"repeat each prompt once per completion")
        for key, column in columns.items():
            if key in RESERVED_ARGUMENTS:
                raise ValueError(f"dataset column '{key}' clashes with the reward-function argument of that name; rename the column")
            if isinstance(column, (str, bytes)) or not hasattr(column, "__len__"):
                raise ValueError(f"dataset column '{key}' is a {type(column).__name__}; expected a list with one value per completion")
            if len(column) != n:
                raise ValueError(f"dataset column '{key}' has {len(column)} values for {n} completions")

    def _warn_once(self, name: str, error: RewardError) -> None:
        if name not in self._warned:
            self._warned.add(name)
            logger.warning("%s; scoring it 0.0 (rewards.on_error=zero; further failures of '%s' are only counted)",
                           error, name)
