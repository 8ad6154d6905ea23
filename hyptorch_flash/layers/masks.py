"""nn.MultiheadAttention mask conventions → the functional op's (F.scaled_dot_product_attention's).

``nn.MultiheadAttention``: bool ``attn_mask`` True = may NOT attend, float added; shape ``(N, M)`` or
``(B·H, N, M)``. ``hyperbolic_attention`` (like SDPA): bool True = MAY attend, float added; shape
broadcastable to ``(B, H, N, M)``; ``causal`` top-left aligned. ``key_padding_mask`` (True = padded)
means the same in both and passes through unchanged.
"""
from __future__ import annotations

from typing import Optional

import torch


def causal_allowed(q_len: int, k_len: int, past: int, device) -> torch.Tensor:
    """Bool ``(q_len, k_len)``, True where query i (absolute position past + i) may see key j ≤ past + i."""
    rows = torch.arange(q_len, device=device)[:, None] + past
    return torch.arange(k_len, device=device)[None, :] <= rows


def module_masks_to_sdpa(attn_mask: Optional[torch.Tensor], *, is_causal: bool, past: int, batch: int,
                         num_heads: int, q_len: int, k_len: int, layer: str):
    """``(causal, mask)`` for :func:`hyperbolic_attention` from a module-convention ``attn_mask``.

    ``past``: number of cached keys before the current queries (KV cache). The functional op's
    ``causal`` is top-left aligned, which is right only without a cache; with one, a single new
    query sees every key (no mask) and several new queries get an explicit bool mask.
    Raises ``ValueError``/``TypeError`` naming the accepted shapes and dtypes.
    """
    mask = None
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"{layer}: attn_mask must be a tensor, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"{layer}: attn_mask must be bool (True = may NOT attend, as nn.MultiheadAttention) "
                            f"or float (added to the scores), got {attn_mask.dtype}")
        shape = tuple(attn_mask.shape)
        if shape == (q_len, k_len):
            mask = attn_mask
        elif shape == (batch * num_heads, q_len, k_len):
            mask = attn_mask.reshape(batch, num_heads, q_len, k_len)
        else:
            raise ValueError(
                f"{layer}: attn_mask must have shape (L, S) = {(q_len, k_len)} or (batch·num_heads, L, S) = "
                f"{(batch * num_heads, q_len, k_len)}, got {shape}"
            )
        if mask.dtype == torch.bool:
            mask = ~mask  # module: True = blocked → SDPA: True = allowed
    if not is_causal:
        return False, mask
    if past == 0:
        return True, mask
    if q_len == 1:
        return False, mask  # the newest token sees all cached keys and itself
    allowed = causal_allowed(q_len, k_len, past, mask.device if mask is not None else None)
    if mask is None:
        return False, allowed
    if mask.dtype == torch.bool:
        return False, mask & allowed
    return False, mask.masked_fill(~allowed, float("-inf"))
