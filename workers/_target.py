"""What a worker runs: ``package.module:function``, loaded, and its kind told from its signature.

========================================  =========================================
handler                                   kind
========================================  =========================================
``async def handler(msg)``                consumer (``--group``, any ``--channel``)
``async def gen(): ... yield payload``    producer: each yielded payload is published
``async def producer(channel, stop)``     producer: given the channel and the stop token
========================================  =========================================

The kind is decided by the number of *required* positional parameters (one: a consumer; two:
a producer given a publisher) or by the function being an async generator. Anything else is
ambiguous and refused with the three shapes in the message.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import sys
from collections.abc import Callable
from typing import Any, Literal

from broker import ConfigurationError

__all__ = ["SHAPES", "Target", "import_from_current_folder", "inspect_target", "load_target"]

#: the accepted shapes, for error messages
SHAPES = (
    "a consumer is `async def handler(msg)`, a producer is an async generator "
    "(`async def orders(): yield payload`) or `async def producer(channel, stop_token)`"
)


@dataclasses.dataclass(frozen=True)
class Target:
    """A loaded handler and how to run it."""

    name: str
    fn: Callable[..., Any]
    #: ``consume``: called per message; ``generate``: an async generator whose items are
    #: published; ``produce``: called once with (channel, stop token)
    style: Literal["consume", "generate", "produce"]

    @property
    def kind(self) -> Literal["consume", "produce"]:
        return "consume" if self.style == "consume" else "produce"


def import_from_current_folder() -> None:
    """Put the current folder first on the import path, as uvicorn, gunicorn, celery and arq do,
    so ``broker worker handlers:handle`` imports ``handlers.py`` from where it runs.

    For the ``broker`` command and its slot processes, not for a library call: the console
    script's own folder is what Python puts first, and ``PYTHONSAFEPATH`` puts nothing.
    """
    here = os.getcwd()
    if sys.path[:1] not in ([here], [""]):
        sys.path.insert(0, here)


def load_target(target: str) -> Callable[..., Any]:
    """Import ``"package.module:function"``.

    :raises ConfigurationError: if it is malformed, missing or not callable.
    """
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ConfigurationError(
            f"handler must look like 'package.module:function', got {target!r}"
        )
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError(f"cannot load {target!r}: {exc}") from exc
    except Exception as exc:  # the module raised while importing (a SyntaxError included)
        raise ConfigurationError(
            f"cannot load {target!r}: importing it raised {type(exc).__name__}: {exc}"
        ) from exc
    if not callable(obj):
        raise ConfigurationError(f"{target!r} is not callable")
    return obj  # type: ignore[no-any-return]


def inspect_target(target: str) -> Target:
    """Load ``target`` and tell its kind from its signature.

    :raises ConfigurationError: if it cannot be loaded, is not async, or its shape is ambiguous.
    """
    fn = load_target(target)
    call = fn if inspect.isfunction(fn) or inspect.ismethod(fn) else getattr(fn, "__call__", fn)  # noqa: B004
    if inspect.isasyncgenfunction(fn) or inspect.isasyncgenfunction(call):
        required = _required(fn, target)
        if required:
            raise ConfigurationError(
                f"{target} is an async generator, so a producer called without arguments, "
                f"but it requires {', '.join(required)}"
            )
        return Target(target, fn, "generate")
    if not (inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(call)):
        raise ConfigurationError(f"{target} is not async: {SHAPES}")
    required = _required(fn, target)
    if len(required) == 1:
        return Target(target, fn, "consume")
    if len(required) == 2:
        return Target(target, fn, "produce")
    got = f"({', '.join(required)})" if required else "no required parameters"
    raise ConfigurationError(f"cannot tell what {target} is from {got}: {SHAPES}")


def _required(fn: Callable[..., Any], target: str) -> list[str]:
    """Names of the required parameters; ``*args`` or a required keyword-only one is ambiguous."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"cannot read the signature of {target}: {exc}") from exc
    names = []
    for p in sig.parameters.values():
        if p.kind is p.VAR_POSITIONAL or (p.kind is p.KEYWORD_ONLY and p.default is p.empty):
            raise ConfigurationError(f"cannot tell what {target} is from {sig}: {SHAPES}")
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty:
            names.append(p.name)
    return names
