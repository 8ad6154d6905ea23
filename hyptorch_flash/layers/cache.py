"""Key/value caches for incremental decoding."""
from __future__ import annotations

from typing import Optional

import torch

from ..ops.linear_attention import LinearAttentionState


class KVCache:
    """Keys and values of one attention layer, ``(B, num_kv_heads, L, head_dim)`` space coordinates.

    ``static=False`` (self-attention): every call appends the new tokens' keys/values, so a decoding
    step projects only the new tokens and attends over L cached keys: O(L) work per token instead of
    recomputing the prefix. Appending concatenates (O(L) copy, the same order as the attention step).
    ``static=True`` (cross-attention to a fixed memory): the first call stores the memory's keys and
    values, later calls reuse them and ignore ``key``/``value``.
    A ``score="linear"`` layer (Hypformer) keeps no keys in a dynamic cache: it keeps the recurrent
    state of its prefix sums instead (:meth:`linear_state`, O(1) memory and work per token).
    Caches hold tensors from the forward pass; decode under ``torch.no_grad()`` unless you mean to
    backpropagate through the whole generation.
    """

    def __init__(self, static: bool = False):
        self.static = static
        self.key: Optional[torch.Tensor] = None
        self.value: Optional[torch.Tensor] = None
        self.state: Optional[LinearAttentionState] = None

    @property
    def length(self) -> int:
        if self.state is not None:
            return self.state.length
        return 0 if self.key is None else self.key.shape[2]

    def linear_state(self) -> LinearAttentionState:
        """The recurrent state of a ``score="linear"`` layer (created on first use)."""
        if self.static or self.key is not None:
            raise ValueError("KVCache: this cache holds keys/values (a static cache, or a softmax-score layer's); "
                             "a score='linear' layer needs its own dynamic cache")
        if self.state is None:
            self.state = LinearAttentionState()
        return self.state

    def update(self, key: torch.Tensor, value: torch.Tensor):
        """Store (static) or append (dynamic) ``key``, ``value``; return the full cached tensors."""
        if self.state is not None:
            raise ValueError("KVCache: this cache holds a score='linear' layer's recurrent state, not keys/values")
        if self.key is None or self.static:
            self.key, self.value = key, value
        else:
            if key.shape[:2] != self.key.shape[:2] or key.shape[3] != self.key.shape[3]:
                raise ValueError(f"KVCache: new keys {tuple(key.shape)} do not extend cached {tuple(self.key.shape)}")
            self.key = torch.cat([self.key, key], dim=2)
            self.value = torch.cat([self.value, value], dim=2)
        return self.key, self.value

    def reset(self) -> None:
        self.key = self.value = None
        self.state = None

    def __repr__(self) -> str:
        kind = ", linear_state" if self.state is not None else ""
        return f"KVCache(length={self.length}, static={self.static}{kind})"
