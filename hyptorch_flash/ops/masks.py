"""Attention masks as additive biases, built one tile at a time.

Conventions follow ``F.scaled_dot_product_attention``: a bool ``attn_mask`` is True where a query
*may* attend; a float ``attn_mask`` is added to the scores; ``key_padding_mask`` ``(B, M)`` is True
for padded keys; ``causal`` lets query i see keys j ≤ i (top-left aligned, as SDPA's ``is_causal``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class MaskSpec:
    """Masks of one attention call, kept in their original (broadcastable) shapes.

    ``attn_mask``: bool or float, broadcastable to ``(B, H, N, M)`` (already 4-D);
    ``key_padding_mask``: bool ``(B, M)``, True = padded; ``causal``: bool.
    """

    causal: bool = False
    attn_mask: Optional[torch.Tensor] = None
    key_padding_mask: Optional[torch.Tensor] = None

    @property
    def empty(self) -> bool:
        return not self.causal and self.attn_mask is None and self.key_padding_mask is None

    def tile_fully_masked(self, i0: int, i1: int, j0: int, j1: int) -> bool:
        """True when causality alone hides every key of the tile (rows i0..i1-1, keys j0..j1-1)."""
        return self.causal and j0 > i1 - 1

    def tile_bias(self, i0: int, i1: int, j0: int, j1: int, dtype: torch.dtype, device) -> Optional[torch.Tensor]:
        """Additive bias (0 or −inf, plus float mask values) broadcastable to ``(B, H, i1-i0, j1-j0)``.

        ``None`` when nothing is masked in this tile.
        """
        bias = None

        def add(term):
            nonlocal bias
            bias = term if bias is None else bias + term

        if self.attn_mask is not None:
            m = self.attn_mask
            # a dim of size 1 broadcasts over queries (or keys): slice only real dims
            m = m[..., i0:i1, :] if m.shape[-2] > 1 else m
            m = m[..., j0:j1] if m.shape[-1] > 1 else m
            if m.dtype == torch.bool:
                add(torch.zeros((), dtype=dtype, device=device).masked_fill(~m, float("-inf")))
            else:
                add(m.to(dtype))
        if self.key_padding_mask is not None:
            pad = self.key_padding_mask[:, None, None, j0:j1]
            add(torch.zeros((), dtype=dtype, device=device).masked_fill(pad, float("-inf")))
        if self.causal and j1 - 1 > i0:
            rows = torch.arange(i0, i1, device=device)[:, None]
            cols = torch.arange(j0, j1, device=device)[None, :]
            add(torch.zeros((), dtype=dtype, device=device).masked_fill(cols > rows, float("-inf")))
        return bias
