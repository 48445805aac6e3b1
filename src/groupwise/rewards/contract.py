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

Beyond TRL's contract, three *context arguments* are passed only to functions whose signature
names them explicitly (a `**kwargs` catch-all does not receive them):

- `group_ids[i]`: completions with equal ids answer the same prompt (one GRPO group); when the
  caller gives none, runs of equal consecutive prompts form the groups;
- `prompt_ids[i]`: the prompt's token ids, without padding (None when the caller has none);
- `reward_context`: a `RewardContext` with the training `device`, and the policy `model` and
  `tokenizer` (None outside a trainer), for rewards that run a model (self-certainty, reward models).

It returns one value per completion: a number, or `None` for "not applicable" (NaN in
`Scores.values`, ignored by `Scores.total`). Functions may be `async def`; all async functions of
one call are awaited concurrently. Sync functions run in the calling thread, because
math-verify's timeouts rely on signals, which only the main thread can receive.

Each call has a time limit (`timeout_s`). In the main thread a sync function that overruns it is
interrupted by a signal sent to that thread (SIGUSR2, raising a `BaseException`, so a reward's
own `except Exception` cannot swallow it); elsewhere it runs on a helper thread that is abandoned
when it overruns. Async functions are cancelled (`asyncio.wait_for`). A computation stuck inside
one C call (a huge integer power, say) can only be interrupted when it returns: rewards that risk
that (math_verify, code_tests) run their work in child processes that are killed instead.

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
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Literal, Sequence

import numpy as np
import torch

from groupwise.registry import Registry
from groupwise.types import Scores

logger = logging.getLogger("groupwise.rewards")

OnError = Literal["raise", "zero"]
RewardFn = Callable[..., Any]

#: Passed only to functions that name them in their signature (see the module docstring).
CONTEXT_ARGUMENTS = ("group_ids", "prompt_ids", "reward_context")
#: Keyword arguments the runner passes itself; a dataset column may not use these names.
RESERVED_ARGUMENTS = ("prompts", "completions", "completion_ids", "trainer_state", *CONTEXT_ARGUMENTS)

_FLOAT32_MAX = float(np.finfo(np.float32).max)


class RewardError(ValueError):
    """A reward function is misconfigured, failed, or returned something outside the contract."""


@dataclass
class RewardContext:
    """What a reward that runs a model needs from the trainer (the `reward_context` argument)."""

    device: torch.device = torch.device("cpu")
    model: Any = None       # the policy being trained; None outside a trainer
    tokenizer: Any = None


def consecutive_groups(prompts: Sequence[Any]) -> list[int]:
    """Group ids from runs of equal consecutive prompts: ['a', 'a', 'b', 'a'] → [0, 0, 1, 2]."""
    ids: list[int] = []
    for i, prompt in enumerate(prompts):
        ids.append(0 if i == 0 else ids[-1] + (prompt != prompts[i - 1]))
    return ids


def context_arguments(fn: Callable[..., Any]) -> tuple[str, ...]:
    """The context arguments `fn` names explicitly in its signature."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # some builtins have no signature
        return ()
    return tuple(a for a in CONTEXT_ARGUMENTS
                 if a in params and params[a].kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD))


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


def _await_all(awaitables: list[Awaitable[Any]], timeout_s: float | None = None) -> list[Any]:
    """Await all concurrently, each within `timeout_s`; each result is the value or the exception it raised."""

    async def one(aw: Awaitable[Any]) -> Any:
        return await asyncio.wait_for(aw, timeout_s) if timeout_s is not None else await aw

    async def gather() -> list[Any]:
        return await asyncio.gather(*(one(a) for a in awaitables), return_exceptions=True)

    try:
        asyncio.get_running_loop()
    except RuntimeError:  # the usual case: no loop in this thread
        return asyncio.run(gather())
    # Called from inside a running loop (a notebook, an async server): it cannot be re-entered,
    # so the awaitables run in a fresh loop on a helper thread while this thread waits.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="groupwise-rewards") as pool:
        return pool.submit(asyncio.run, gather()).result()


# ----------------------------------------------------------------------------- time limits


class RewardTimeout(BaseException):
    """Raised inside a sync reward function that overran its time limit.

    A BaseException, so that a reward's own `except Exception` cannot swallow it."""


class RewardTimedOut(RewardError):
    """A reward function did not return within its time limit."""


_TIMEOUT_SIGNAL = signal.SIGUSR2
_armed = threading.local()


def _on_timeout_signal(signum: int, frame: Any) -> None:
    if getattr(_armed, "active", False):  # a late signal, after the call returned, is ignored
        _armed.active = False
        raise RewardTimeout()


def call_with_timeout(fn: Callable[..., Any], kwargs: dict[str, Any], timeout_s: float | None) -> Any:
    """`fn(**kwargs)`, or `RewardTimeout` once it has run `timeout_s` seconds.

    In the main thread a watchdog thread sends SIGUSR2 to it (this does not disturb math-verify's
    SIGALRM timeouts, and wakes a blocking sleep); elsewhere `fn` runs on a daemon thread that is
    left behind if it overruns.
    """
    if timeout_s is None:
        return fn(**kwargs)
    if threading.current_thread() is not threading.main_thread():
        return _call_on_helper_thread(fn, kwargs, timeout_s)
    main = threading.main_thread().ident

    def fire() -> None:
        signal.pthread_kill(main, _TIMEOUT_SIGNAL)

    previous = signal.signal(_TIMEOUT_SIGNAL, _on_timeout_signal)
    timer = threading.Timer(timeout_s, fire)
    timer.daemon = True
    _armed.active = True
    timer.start()
    try:
        return fn(**kwargs)
    finally:
        _armed.active = False
        timer.cancel()
        timer.join()  # a timer past its check may still send the signal: wait, so it meets our handler
        signal.signal(_TIMEOUT_SIGNAL, previous)


def _call_on_helper_thread(fn: Callable[..., Any], kwargs: dict[str, Any], timeout_s: float) -> Any:
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn(**kwargs)
        except BaseException as e:  # noqa: BLE001 - handed back to the caller
            box["error"] = e

    worker = threading.Thread(target=run, name="groupwise-reward", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise RewardTimeout()
    if "error" in box:
        raise box["error"]
    return box.get("value")


# ----------------------------------------------------------------------------- the runner


class RewardRunner:
    """Calls K reward functions on N completions and returns checked `Scores` ([N, K])."""

    def __init__(self, functions: Sequence[Any], on_error: OnError = "raise", timeout_s: float | None = None):
        """`functions`: objects with `.name`, `.weight`, `.kwargs` (e.g. `RewardFunctionConfig`);
        `timeout_s`: the time limit of one function's call on one batch (None: no limit)."""
        specs = [(spec.name, load_reward_function(spec.name, getattr(spec, "kwargs", None) or {}), spec.weight)
                 for spec in functions]
        display = [name if name in REWARDS else _callable_name(fn) for name, fn, _ in specs]
        self._setup([s[0] for s in specs], display, [s[1] for s in specs], [s[2] for s in specs], on_error, timeout_s)

    @classmethod
    def from_callables(cls, functions: Sequence[tuple[str, RewardFn, float]], on_error: OnError = "raise",
                       timeout_s: float | None = None) -> "RewardRunner":
        """A runner over already-built callables, given as `(name, function, weight)`."""
        runner = cls.__new__(cls)
        for name, fn, _ in functions:
            if not callable(fn):
                raise RewardError(f"reward function '{name}' is a {type(fn).__name__}, not a callable")
        names = [name for name, _, _ in functions]
        runner._setup(names, names, [f for _, f, _ in functions], [w for _, _, w in functions], on_error, timeout_s)
        return runner

    def _setup(self, specs: list[str], names: list[str], fns: list[RewardFn], weights: list[float], on_error: str,
               timeout_s: float | None) -> None:
        if not fns:
            raise ValueError("RewardRunner needs at least one reward function")
        if on_error not in ("raise", "zero"):
            raise ValueError(f"on_error must be 'raise' or 'zero', not {on_error!r}")
        if timeout_s is not None and not (isinstance(timeout_s, numbers.Real) and math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(f"timeout_s must be a positive number of seconds or None, not {timeout_s!r}")
        for name, w in zip(names, weights):
            if not isinstance(w, numbers.Real) or not math.isfinite(float(w)):
                raise ValueError(f"reward function '{name}' has weight {w!r}; weights must be finite numbers")
        self._specs = list(specs)
        self._names = _unique(names)
        self._functions = list(fns)
        self._weights = [float(w) for w in weights]
        self.on_error: OnError = on_error  # type: ignore[assignment]
        self.timeout_s = None if timeout_s is None else float(timeout_s)
        self.context = RewardContext()
        self._context_args = [context_arguments(fn) for fn in fns]
        self._warned: set[str] = set()

    def bind(self, device: Any = None, model: Any = None, tokenizer: Any = None) -> "RewardRunner":
        """Give rewards that run a model the training device and the policy (`reward_context`)."""
        self.context = RewardContext(device=torch.device(device) if device is not None else self.context.device,
                                     model=model, tokenizer=tokenizer)
        return self

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
        group_ids: Sequence[int] | None = None,
        prompt_ids: Sequence[Sequence[int]] | None = None,
    ) -> Scores:
        """Call every function on the N completions and validate what each returns."""
        columns = dict(columns or {})
        n = len(completions)
        self._check_inputs(prompts, completion_ids, columns, n)
        for name, given in (("group_ids", group_ids), ("prompt_ids", prompt_ids)):
            if given is not None and len(given) != n:
                raise ValueError(f"got {len(given)} {name} for {n} completions")
        if n == 0:
            empty = torch.zeros(0, len(self._functions), dtype=torch.float32)
            return Scores(values=empty, names=self.names, weights=self.weights, function_errors=[0] * len(self))
        groups = [int(g) for g in group_ids] if group_ids is not None else consecutive_groups(prompts)
        context = {"group_ids": groups, "prompt_ids": None if prompt_ids is None else [list(p) for p in prompt_ids],
                   "reward_context": self.context}

        def kwargs(k: int) -> dict[str, Any]:  # fresh lists per call: one function cannot mutate another's input
            extra = {a: (list(context[a]) if isinstance(context[a], list) else context[a]) for a in self._context_args[k]}
            return dict(prompts=list(prompts), completions=list(completions), completion_ids=list(completion_ids),
                        trainer_state=trainer_state, **{k: list(v) for k, v in columns.items()}, **extra)

        outputs: list[Any] = [None] * len(self._functions)
        failed: list[Exception | None] = [None] * len(self._functions)
        pending: dict[int, Awaitable[Any]] = {}
        for k, fn in enumerate(self._functions):  # sync ones run here, in the calling thread
            try:
                out = call_with_timeout(fn, kwargs(k), self.timeout_s)
            except RewardTimeout:
                failed[k] = self._timed_out(k, n)
                if self.on_error == "raise":
                    for aw in pending.values():
                        getattr(aw, "close", lambda: None)()
                    raise failed[k]
                continue
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
            for k, result in zip(pending, _await_all(list(pending.values()), self.timeout_s)):
                if isinstance(result, (asyncio.TimeoutError, TimeoutError)) and self.timeout_s is not None:
                    failed[k] = self._timed_out(k, n)
                elif isinstance(result, Exception):
                    failed[k] = result
                elif isinstance(result, BaseException):  # KeyboardInterrupt, cancellation
                    raise result
                else:
                    outputs[k] = result

        values = [[0.0] * len(self._functions) for _ in range(n)]  # [N, K]; failures stay 0.0
        errors = [0] * len(self._functions)
        for k, name in enumerate(self._names):
            try:
                if isinstance(failed[k], RewardTimedOut):
                    raise failed[k]
                if failed[k] is not None:
                    raise _raised(name, failed[k]) from failed[k]
                column = _as_value_list(name, outputs[k], n)
            except RewardError as e:
                if self.on_error == "raise":
                    raise
                self._warn_once(name, e)
                errors[k] += n
                continue
            for i, v in enumerate(column):
                try:
                    values[i][k] = _as_float(name, i, v)
                except RewardError as e:
                    if self.on_error == "raise":
                        raise
                    self._warn_once(name, e)
                    errors[k] += 1
        return Scores(values=torch.tensor(values, dtype=torch.float32), names=self.names,
                      weights=self.weights, num_errors=sum(errors), function_errors=errors)

    def _timed_out(self, k: int, n: int) -> RewardTimedOut:
        return RewardTimedOut(f"reward function '{self._names[k]}' did not return within rewards.timeout_s = "
                              f"{self.timeout_s:g} s on a batch of {n} completions (samples 0–{n - 1})")

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
