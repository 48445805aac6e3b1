"""Name → function registries: how a config selects a part, and how users add their own.

A name is either a registered one (`grpo`) or an import path to the user's own function
(`my_pkg.module:func`, `my_pkg.module.func`, or `path/to/file.py:func`).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable, Generic, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class UnknownPartError(KeyError):
    """An unknown part name; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0])


def import_object(spec: str) -> Any:
    """Import `pkg.mod:attr`, `pkg.mod.attr` or `file.py:attr`. Raises ValueError with the reason."""
    if ":" in spec:
        module_part, attr = spec.rsplit(":", 1)
    elif "." in spec:
        module_part, attr = spec.rsplit(".", 1)
    else:
        raise ValueError(f"'{spec}' is not an import path (expected 'module:function' or 'file.py:function')")
    if module_part.endswith(".py"):
        path = Path(module_part).expanduser()
        if not path.is_file():
            raise ValueError(f"file '{path}' named by '{spec}' does not exist")
        mod_name = f"groupwise_user_{abs(hash(str(path.resolve())))}"
        if mod_name in sys.modules:
            module = sys.modules[mod_name]
        else:
            loader_spec = importlib.util.spec_from_file_location(mod_name, path)
            assert loader_spec is not None and loader_spec.loader is not None
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[mod_name] = module
            loader_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_part)
        except ImportError as e:
            raise ValueError(f"cannot import module '{module_part}' named by '{spec}': {e}") from e
    if not hasattr(module, attr):
        raise ValueError(f"'{module_part}' has no attribute '{attr}' (from '{spec}')")
    return getattr(module, attr)


class Registry(Generic[F]):
    """A named collection of one kind of part (advantage estimator, loss, reward, …)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        def decorator(fn: F) -> F:
            if name in self._items and self._items[name] is not fn:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self._items[name] = fn
            return fn

        return decorator

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def items(self) -> list[tuple[str, F]]:
        return sorted(self._items.items())

    def get(self, name: str) -> F:
        if name in self._items:
            return self._items[name]
        if ":" in name or name.endswith(".py") or "." in name:
            try:
                return import_object(name)
            except ValueError as e:
                raise UnknownPartError(f"{self.kind} '{name}' could not be loaded: {e}") from None
        raise UnknownPartError(
            f"unknown {self.kind} '{name}'; known: {', '.join(self.names())} "
            f"(or an import path such as 'my_module:my_function')"
        )
