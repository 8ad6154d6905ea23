"""Backend registry and selection: per call, by context manager, by environment variable.

Precedence: ``backend=`` argument > innermost :func:`attention_backend` context >
``$HYPTORCH_FLASH_BACKEND`` > ``"auto"``. ``auto`` tries the backends in ``AUTO_ORDER`` and takes the
first that supports the inputs, logging (once per reason) why it passed over the faster ones.
An explicitly named backend that cannot run the inputs raises; it never falls back silently.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from .problem import AttentionProblem

logger = logging.getLogger("hyptorch_flash")

ENV_VAR = "HYPTORCH_FLASH_BACKEND"
AUTO = "auto"


@dataclass(frozen=True)
class Backend:
    """A way to run attention.

    ``run(problem) -> (output, lse)``; ``unsupported(problem)`` returns ``None`` when the backend
    can run the problem, else a short reason.
    """

    name: str
    run: Callable[[AttentionProblem], tuple]
    unsupported: Callable[[AttentionProblem], Optional[str]]
    description: str = ""


_REGISTRY: dict[str, Backend] = {}
AUTO_ORDER = ("cuda", "blockwise", "reference")
_current: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("hyptorch_flash_backend", default=None)
_logged_reasons: set[str] = set()


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend in the registry."""
    _REGISTRY[backend.name] = backend


def backend_names() -> list[str]:
    """Valid backend names, ``"auto"`` included."""
    return [AUTO, *_REGISTRY]


def _check_name(name) -> str:
    if name != AUTO and name not in _REGISTRY:
        raise ValueError(f"hyptorch_flash: unknown attention backend {name!r}; valid backends are {backend_names()}")
    return name


def requested_backend(explicit: Optional[str] = None) -> str:
    """The backend name in force for a call (see the module docstring for the precedence)."""
    if explicit is not None:
        return _check_name(explicit)
    name = _current.get()
    if name is not None:
        return name
    env = os.environ.get(ENV_VAR)
    if env:
        try:
            return _check_name(env.strip())
        except ValueError as e:
            raise ValueError(f"{e} (from ${ENV_VAR})") from None
    return AUTO


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Context manager: every attention call inside uses backend ``name`` unless the call names one."""
    token = _current.set(_check_name(name))
    try:
        yield
    finally:
        _current.reset(token)


def select_backend(problem: AttentionProblem, explicit: Optional[str] = None) -> Backend:
    """The backend that runs ``problem``; raises ``RuntimeError`` if a named backend cannot."""
    name = requested_backend(explicit)
    if name != AUTO:
        backend = _REGISTRY[name]
        reason = backend.unsupported(problem)
        if reason is not None:
            raise RuntimeError(f"hyptorch_flash: backend {name!r} cannot run these inputs: {reason}")
        return backend
    passed_over = []
    for candidate in AUTO_ORDER:
        backend = _REGISTRY.get(candidate)
        if backend is None:
            continue
        reason = backend.unsupported(problem)
        if reason is None:
            if passed_over:
                _log_fallback(backend.name, passed_over, on_gpu=problem.q.is_cuda)
            return backend
        passed_over.append(f"{candidate}: {reason}")
    raise RuntimeError(f"hyptorch_flash: no backend can run these inputs ({'; '.join(passed_over)})")


def _log_fallback(chosen: str, passed_over: list[str], on_gpu: bool) -> None:
    message = f"hyptorch_flash auto backend chose {chosen!r} ({'; '.join(passed_over)})"
    if message in _logged_reasons:
        return
    _logged_reasons.add(message)
    # On CPU the fallback is the expected path; on GPU it costs speed, so it is a warning.
    logger.log(logging.WARNING if on_gpu else logging.INFO, message)
