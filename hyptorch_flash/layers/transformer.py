"""Lorentz transformer encoder/decoder layers and stacks (pre-norm, LResNet residuals).

Architecture of HyperCore's / HELM's Lorentz transformer (He et al. 2025, "HELM: Hyperbolic Large
Language Models via Mixture-of-Curvature Experts"; "Lorentzian Residual Neural Networks", KDD 2025)
with HyboNet's attention (Chen et al. 2022, ACL): for each sublayer f,

    x ← LResNet(x, Dropout(f(LayerNorm(x))))

where every piece maps H_k to H_k (:class:`LorentzLayerNorm`, :class:`HyperbolicMultiheadAttention`,
:class:`LorentzFeedForward`, :class:`LorentzResidual`). Tensors are full Lorentz points
``(batch, seq, embed_dim + 1)`` (``batch_first=True``) or ``(seq, batch, embed_dim + 1)``.

Curvature of a stack (``learnable_curvature``): ``False`` one fixed k for all layers; ``True`` or
``"shared"`` one learnable k shared by all layers (``stack.curvature``, pass it to the embedding and
the head to share it with them); ``"per_layer"`` a learnable k_i per layer (initialised to the value
of ``curvature``), points handed from layer to layer by the similarity x ↦ sqrt(k_{i+1}/k_i)·x. A
``Curvature`` instance passed as ``curvature`` is shared by all layers, except with ``"per_layer"``,
where it is the curvature of the *input* only (share it with the embedding). The stack takes its input
on ``stack.curvature`` and returns points on ``stack.output_curvature`` (the last layer's).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
from torch import nn

from .attention import HyperbolicMultiheadAttention
from .cache import KVCache
from .curvature import Curvature, CurvatureArg, as_curvature, rescale
from .dropout import LorentzDropout
from .feedforward import LorentzFeedForward
from .norm import LorentzLayerNorm
from .points import check_points
from .residual import LorentzResidual


def _attention(embed_dim, num_heads, curvature, batch_first, attn_kwargs) -> HyperbolicMultiheadAttention:
    return HyperbolicMultiheadAttention(embed_dim, num_heads, curvature=curvature, batch_first=batch_first,
                                        check_inputs=False, **attn_kwargs)


class LorentzTransformerEncoderLayer(nn.Module):
    r"""Pre-norm Lorentz encoder layer: x ← R(x, attn(LN(x))); x ← R(x, FFN(LN(x))).

    See the module docstring for the construction and papers. Args as ``nn.TransformerEncoderLayer``
    where they exist (``embed_dim`` = d_model counts space dimensions; ``ffn_dim`` = dim_feedforward,
    default 4·embed_dim; ``batch_first`` default True); attention options (``num_kv_heads``,
    ``score``, ``tau``, ``beta``, ``squared``, ``learnable_scale``, ``per_head_curvature``,
    ``attn_backend``, ``projection``) go to :class:`HyperbolicMultiheadAttention`.

    ``forward(src, src_mask=None, src_key_padding_mask=None, is_causal=False)``: ``src``
    ``(B, N, embed_dim + 1)`` on H_k → same shape on H_k. Masks follow ``nn.MultiheadAttention``
    (bool True = may NOT attend; key padding True = padded).
    """

    def __init__(self, embed_dim: int, num_heads: int, ffn_dim: Optional[int] = None, *, dropout: float = 0.0,
                 activation: Optional[Callable] = None, curvature: CurvatureArg = 1.0,
                 learnable_curvature: bool = False, batch_first: bool = True, check_inputs: bool = True,
                 **attn_kwargs):
        super().__init__()
        self.embed_dim, self.batch_first, self.check_inputs = embed_dim, batch_first, check_inputs
        self.curvature = as_curvature(curvature, learnable=learnable_curvature)
        shared = dict(curvature=self.curvature, check_inputs=False)
        self.norm1 = LorentzLayerNorm(embed_dim, **shared)
        self.self_attn = _attention(embed_dim, num_heads, self.curvature, batch_first, attn_kwargs)
        self.residual1 = LorentzResidual(embed_dim, **shared)
        self.norm2 = LorentzLayerNorm(embed_dim, **shared)
        self.ffn = LorentzFeedForward(embed_dim, ffn_dim or 4 * embed_dim, activation=activation, dropout=dropout,
                                      **shared)
        self.residual2 = LorentzResidual(embed_dim, **shared)
        self.dropout = LorentzDropout(dropout, curvature=self.curvature)

    def forward(self, src: torch.Tensor, src_mask: Optional[torch.Tensor] = None,
                src_key_padding_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        check_points(src, self.embed_dim, self.curvature(), name="src", layer=type(self).__name__,
                     check_manifold=self.check_inputs)
        attn, _ = self.self_attn(self.norm1(src), attn_mask=src_mask, key_padding_mask=src_key_padding_mask,
                                 is_causal=is_causal)
        x = self.residual1(src, self.dropout(attn))
        return self.residual2(x, self.dropout(self.ffn(self.norm2(x))))


@dataclass
class DecoderLayerCache:
    """Caches of one decoder layer: self-attention keys/values (growing) and cross-attention (static)."""

    self_attn: KVCache = field(default_factory=KVCache)
    cross_attn: KVCache = field(default_factory=lambda: KVCache(static=True))

    @property
    def length(self) -> int:
        return self.self_attn.length


class LorentzTransformerDecoderLayer(nn.Module):
    r"""Pre-norm Lorentz decoder layer: causal self-attention, optional cross-attention, feed-forward.

    x ← R(x, self_attn(LN(x))); x ← R(x, cross_attn(LN(x), memory)) if ``cross_attention``;
    x ← R(x, FFN(LN(x))). With ``cross_attention=False`` it is a decoder-only (GPT-style) block.
    Args as :class:`LorentzTransformerEncoderLayer`; ``memory_dim`` (space dims of the memory,
    default embed_dim).

    ``forward(tgt, memory=None, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
    memory_key_padding_mask=None, tgt_is_causal=True, cache=None)``: ``tgt`` ``(B, N, embed_dim + 1)``,
    ``memory`` ``(B, S, memory_dim + 1)`` on H_k. ``cache`` (:class:`DecoderLayerCache`) enables
    incremental decoding: pass only the new tokens; ``tgt_key_padding_mask`` then covers all cached
    positions ``(B, past + N)``.
    """

    def __init__(self, embed_dim: int, num_heads: int, ffn_dim: Optional[int] = None, *, dropout: float = 0.0,
                 activation: Optional[Callable] = None, curvature: CurvatureArg = 1.0,
                 learnable_curvature: bool = False, batch_first: bool = True, cross_attention: bool = True,
                 memory_dim: Optional[int] = None, check_inputs: bool = True, **attn_kwargs):
        super().__init__()
        self.embed_dim, self.batch_first, self.check_inputs = embed_dim, batch_first, check_inputs
        self.memory_dim = embed_dim if memory_dim is None else memory_dim
        self.curvature = as_curvature(curvature, learnable=learnable_curvature)
        shared = dict(curvature=self.curvature, check_inputs=False)
        self.norm1 = LorentzLayerNorm(embed_dim, **shared)
        self.self_attn = _attention(embed_dim, num_heads, self.curvature, batch_first, attn_kwargs)
        self.residual1 = LorentzResidual(embed_dim, **shared)
        if cross_attention:
            self.norm_cross = LorentzLayerNorm(embed_dim, **shared)
            self.cross_attn = _attention(embed_dim, num_heads, self.curvature, batch_first,
                                         dict(attn_kwargs, kdim=self.memory_dim))
            self.residual_cross = LorentzResidual(embed_dim, **shared)
        else:
            self.cross_attn = None
        self.norm2 = LorentzLayerNorm(embed_dim, **shared)
        self.ffn = LorentzFeedForward(embed_dim, ffn_dim or 4 * embed_dim, activation=activation, dropout=dropout,
                                      **shared)
        self.residual2 = LorentzResidual(embed_dim, **shared)
        self.dropout = LorentzDropout(dropout, curvature=self.curvature)

    def forward(self, tgt: torch.Tensor, memory: Optional[torch.Tensor] = None,
                tgt_mask: Optional[torch.Tensor] = None, memory_mask: Optional[torch.Tensor] = None,
                tgt_key_padding_mask: Optional[torch.Tensor] = None,
                memory_key_padding_mask: Optional[torch.Tensor] = None, tgt_is_causal: bool = True,
                cache: Optional[DecoderLayerCache] = None) -> torch.Tensor:
        name = type(self).__name__
        k = self.curvature()
        check_points(tgt, self.embed_dim, k, name="tgt", layer=name, check_manifold=self.check_inputs)
        attn, _ = self.self_attn(self.norm1(tgt), attn_mask=tgt_mask, key_padding_mask=tgt_key_padding_mask,
                                 is_causal=tgt_is_causal, cache=None if cache is None else cache.self_attn)
        x = self.residual1(tgt, self.dropout(attn))
        if self.cross_attn is not None:
            cross_cache = None if cache is None else cache.cross_attn
            if memory is None and (cross_cache is None or cross_cache.length == 0):
                raise ValueError(f"{name}: this layer has cross-attention and needs memory (or build it with "
                                 "cross_attention=False for a decoder-only model)")
            if memory is not None:
                check_points(memory, self.memory_dim, k, name="memory", layer=name, check_manifold=self.check_inputs)
            attn, _ = self.cross_attn(self.norm_cross(x), memory, memory, attn_mask=memory_mask,
                                      key_padding_mask=memory_key_padding_mask, cache=cross_cache)
            x = self.residual_cross(x, self.dropout(attn))
        return self.residual2(x, self.dropout(self.ffn(self.norm2(x))))


CURVATURE_MODES = (False, True, "shared", "per_layer")


def _stack_curvatures(num_layers: int, curvature: CurvatureArg, learnable_curvature: Union[bool, str]):
    """(input curvature, per-layer curvatures) of a stack; see the module docstring."""
    if learnable_curvature not in CURVATURE_MODES:
        raise ValueError(f"learnable_curvature must be one of {CURVATURE_MODES}, got {learnable_curvature!r}")
    if learnable_curvature == "per_layer":
        given = as_curvature(curvature)
        k0 = given().detach()
        return given, [Curvature(k0, learnable=True) for _ in range(num_layers)]
    shared = as_curvature(curvature, learnable=bool(learnable_curvature))
    return shared, [shared] * num_layers


class _LorentzStack(nn.Module):
    """Layers applied in turn, with curvature hand-over between layers and an optional final norm."""

    def __init__(self, layer_cls, num_layers, embed_dim, num_heads, ffn_dim, curvature, learnable_curvature,
                 final_norm, batch_first, check_inputs, layer_kwargs):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"{type(self).__name__}: num_layers must be ≥ 1, got {num_layers}")
        self.embed_dim, self.batch_first, self.check_inputs = embed_dim, batch_first, check_inputs
        self.input_curvature, curvatures = _stack_curvatures(num_layers, curvature, learnable_curvature)
        self.layers = nn.ModuleList(
            layer_cls(embed_dim, num_heads, ffn_dim, curvature=c, batch_first=batch_first, check_inputs=False,
                      **layer_kwargs)
            for c in curvatures
        )
        self.norm = LorentzLayerNorm(embed_dim, curvature=curvatures[-1], check_inputs=False) if final_norm else None

    @property
    def curvature(self) -> Curvature:
        """The curvature of the stack's input."""
        return self.input_curvature

    @property
    def output_curvature(self) -> Curvature:
        return self.layers[-1].curvature

    def _check(self, x: torch.Tensor, name: str) -> None:
        check_points(x, self.embed_dim, self.curvature(), name=name, layer=type(self).__name__,
                     check_manifold=self.check_inputs)

    def _run(self, x: torch.Tensor, call) -> torch.Tensor:
        prev = self.input_curvature
        for i, layer in enumerate(self.layers):
            if layer.curvature is not prev:
                x = rescale(x, prev(), layer.curvature())
            x = call(i, layer, x)
            prev = layer.curvature
        return x if self.norm is None else self.norm(x)


class LorentzTransformerEncoder(_LorentzStack):
    r"""A stack of :class:`LorentzTransformerEncoderLayer` with an optional final Lorentz LayerNorm.

    ``LorentzTransformerEncoder(num_layers, embed_dim, num_heads, ffn_dim=None, *, curvature=1.0,
    learnable_curvature=False, final_norm=True, batch_first=True, check_inputs=True, **layer_kwargs)``;
    curvature modes in the module docstring. ``forward(src, mask=None, src_key_padding_mask=None,
    is_causal=False)``: ``(B, N, embed_dim + 1)`` on ``curvature`` → same shape on ``output_curvature``.
    """

    def __init__(self, num_layers: int, embed_dim: int, num_heads: int, ffn_dim: Optional[int] = None, *,
                 curvature: CurvatureArg = 1.0, learnable_curvature: Union[bool, str] = False,
                 final_norm: bool = True, batch_first: bool = True, check_inputs: bool = True, **layer_kwargs):
        super().__init__(LorentzTransformerEncoderLayer, num_layers, embed_dim, num_heads, ffn_dim, curvature,
                         learnable_curvature, final_norm, batch_first, check_inputs, layer_kwargs)

    def forward(self, src: torch.Tensor, mask: Optional[torch.Tensor] = None,
                src_key_padding_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        self._check(src, "src")
        return self._run(src, lambda i, layer, x: layer(x, mask, src_key_padding_mask, is_causal))


class LorentzTransformerDecoder(_LorentzStack):
    r"""A stack of :class:`LorentzTransformerDecoderLayer` with an optional final Lorentz LayerNorm.

    Same constructor as :class:`LorentzTransformerEncoder` plus the layer options ``cross_attention``
    (default True; False = decoder-only) and ``memory_dim``. ``forward(tgt, memory=None, tgt_mask=None,
    memory_mask=None, tgt_key_padding_mask=None, memory_key_padding_mask=None, tgt_is_causal=True,
    cache=None)``; ``memory`` is taken on the stack's input curvature and handed to each layer's.
    Incremental decoding: ``cache = decoder.new_cache()``, then call with the new tokens only.
    """

    def __init__(self, num_layers: int, embed_dim: int, num_heads: int, ffn_dim: Optional[int] = None, *,
                 curvature: CurvatureArg = 1.0, learnable_curvature: Union[bool, str] = False,
                 final_norm: bool = True, batch_first: bool = True, check_inputs: bool = True, **layer_kwargs):
        super().__init__(LorentzTransformerDecoderLayer, num_layers, embed_dim, num_heads, ffn_dim, curvature,
                         learnable_curvature, final_norm, batch_first, check_inputs, layer_kwargs)

    def new_cache(self) -> list:
        """One empty :class:`DecoderLayerCache` per layer."""
        return [DecoderLayerCache() for _ in self.layers]

    def forward(self, tgt: torch.Tensor, memory: Optional[torch.Tensor] = None,
                tgt_mask: Optional[torch.Tensor] = None, memory_mask: Optional[torch.Tensor] = None,
                tgt_key_padding_mask: Optional[torch.Tensor] = None,
                memory_key_padding_mask: Optional[torch.Tensor] = None, tgt_is_causal: bool = True,
                cache: Optional[list] = None) -> torch.Tensor:
        self._check(tgt, "tgt")
        if cache is not None and len(cache) != len(self.layers):
            raise ValueError(f"{type(self).__name__}: cache has {len(cache)} entries for {len(self.layers)} layers "
                             "(use decoder.new_cache())")
        k_in = self.curvature

        def call(i, layer, x):
            mem = memory
            if mem is not None and layer.curvature is not k_in:
                mem = rescale(mem, k_in(), layer.curvature())
            return layer(x, mem, tgt_mask, memory_mask, tgt_key_padding_mask, memory_key_padding_mask,
                         tgt_is_causal, None if cache is None else cache[i])

        return self._run(tgt, call)
