"""Model-wide attention backend switch."""
from __future__ import annotations

from typing import Optional

from torch import nn

from ..ops import backends


def set_attention_backend(model: nn.Module, name: Optional[str]) -> nn.Module:
    """Set ``attn_backend`` of every attention layer in ``model`` (itself included) to ``name``.

    ``name``: ``"reference" | "blockwise" | "cuda" | "auto"``, or ``None`` to let each call follow the
    :func:`hyptorch_flash.attention_backend` context manager, then ``$HYPTORCH_FLASH_BACKEND``, then
    ``"auto"``. A per-layer setting wins over the context manager and the environment variable.
    Returns ``model``; raises ``ValueError`` for an unknown name (listing the valid ones) and
    ``TypeError`` when ``model`` has no attention layer.
    """
    if name is not None:
        backends.requested_backend(name)  # validates the name
    found = 0
    for module in model.modules():
        if hasattr(module, "attn_backend"):
            module.attn_backend = name
            found += 1
    if not found:
        raise TypeError(f"set_attention_backend: {type(model).__name__} contains no hyperbolic attention layer")
    return model
