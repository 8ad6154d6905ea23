"""Hyperbolic transformer encoder/decoder layers and stacks, Lorentz and Poincaré (pre-norm).

Lorentz: the architecture of HyperCore's / HELM's Lorentz transformer (He et al. 2025, "HELM:
Hyperbolic Large Language Models via Mixture-of-Curvature Experts"; He, Yang, Ying 2025, "Lorentzian
Residual Neural Networks", KDD) with HyboNet's attention (Chen et al. 2022, ACL): for each sublayer f,

    x ← LResNet(x, Dropout(f(LayerNorm(x))))

where every piece maps H_k to H_k (:class:`LorentzLayerNorm`, :class:`HyperbolicMultiheadAttention`,
:class:`LorentzFeedForward`, :class:`LorentzResidual`). Tensors are full Lorentz points
``(batch, seq, embed_dim + 1)`` (``batch_first=True``) or ``(seq, batch, embed_dim + 1)``.

Poincaré: the same skeleton with HNN++'s pieces (Shimizu et al. 2021, ICLR): Möbius LayerNorm,
:class:`PoincareMultiheadAttention`, :class:`PoincareFeedForward` and Möbius-addition residuals;
tensors are ball points ``(batch, seq, embed_dim)`` of geoopt ``PoincareBall(c=1/k)``.

Curvature of a stack (``learnable_curvature``): ``False`` one fixed k for all layers; ``True`` or
``"shared"`` one learnable k shared by all layers (``stack.curvature``, pass it to the embedding and
the head to share it with them); ``"per_layer"`` a learnable k_i per layer (initialised to the value
of ``curvature``), points handed from layer to layer by the similarity x ↦ sqrt(k_{i+1}/k_i)·x (in
both models). A ``Curvature`` instance passed as ``curvature`` is shared by all layers, except with
``"per_layer"``, where it is the curvature of the *input* only (share it with the embedding). The stack
takes its input on ``stack.curvature`` and returns points on ``stack.output_curvature``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
from torch import nn

from .attention import HyperbolicMultiheadAttention, PoincareMultiheadAttention
from .cache import KVCache
from .curvature import Curvature, CurvatureArg, as_curvature, rescale
from .dropout import LorentzDropout
from .feedforward import LorentzFeedForward
from .norm import LorentzLayerNorm
from .poincare import PoincareDropout, PoincareFeedForward, PoincareLayerNorm, PoincareResidual
from .points import check_ball_points, check_points
from .residual import LorentzResidual


@dataclass(frozen=True)
class _Kit:
    """The layers of one model of hyperbolic space that a transformer block is built from."""

    norm: type
    attention: type
    feedforward: type
    residual: type
    dropout: type
    check: Callable


LORENTZ = _Kit(LorentzLayerNorm, HyperbolicMultiheadAttention, LorentzFeedForward, LorentzResidual, LorentzDropout,
               check_points)
POINCARE = _Kit(PoincareLayerNorm, PoincareMultiheadAttention, PoincareFeedForward, PoincareResidual,
                PoincareDropout, check_ball_points)


class _Block(nn.Module):
    """Pre-norm sublayers x ← R(x, Dropout(f(LN(x)))) built from ``kit``."""

    kit: _Kit

    def __init__(self, embed_dim, num_heads, ffn_dim, *, dropout, activation, curvature, learnable_curvature,
                 batch_first, check_inputs, attn_kwargs, cross_attention=False, memory_dim=None):
        super().__init__()
        kit = self.kit
        self.embed_dim, self.batch_first, self.check_inputs = embed_dim, batch_first, check_inputs
        self.memory_dim = embed_dim if memory_dim is None else memory_dim
        self.curvature = as_curvature(curvature, learnable=learnable_curvature)
        shared = dict(curvature=self.curvature, check_inputs=False)

        def attention(**extra):
            return kit.attention(embed_dim, num_heads, batch_first=batch_first, **shared, **attn_kwargs, **extra)

        self.norm1, self.self_attn, self.residual1 = kit.norm(embed_dim, **shared), attention(), kit.residual(embed_dim, **shared)
        if cross_attention:
            self.norm_cross = kit.norm(embed_dim, **shared)
            self.cross_attn = attention(kdim=self.memory_dim)
            self.residual_cross = kit.residual(embed_dim, **shared)
        else:
            self.cross_attn = None
        self.norm2 = kit.norm(embed_dim, **shared)
        self.ffn = kit.feedforward(embed_dim, ffn_dim or 4 * embed_dim, activation=activation, dropout=dropout, **shared)
        self.residual2 = kit.residual(embed_dim, **shared)
        self.dropout = kit.dropout(dropout, curvature=self.curvature)

    def _check(self, x: torch.Tensor, dim: int, name: str) -> None:
        self.kit.check(x, dim, self.curvature(), name=name, layer=type(self).__name__, check_manifold=self.check_inputs)

    def _attend(self, x, attn, norm, residual, *args, **kwargs):
        out, _ = attn(norm(x), *args, **kwargs)
        return residual(x, self.dropout(out))

    def _feedforward(self, x):
        return self.residual2(x, self.dropout(self.ffn(self.norm2(x))))


class _EncoderLayer(_Block):
    def __init__(self, embed_dim: int, num_heads: int, ffn_dim: Optional[int] = None, *, dropout: float = 0.0,
                 activation: Optional[Callable] = None, curvature: CurvatureArg = 1.0,
                 learnable_curvature: bool = False, batch_first: bool = True, check_inputs: bool = True,
                 **attn_kwargs):
        super().__init__(embed_dim, num_heads, ffn_dim, dropout=dropout, activation=activation, curvature=curvature,
                         learnable_curvature=learnable_curvature, batch_first=batch_first,
                         check_inputs=check_inputs, attn_kwargs=attn_kwargs)

    def forward(self, src: torch.Tensor, src_mask: Optional[torch.Tensor] = None,
                src_key_padding_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        self._check(src, self.embed_dim, "src")
        x = self._attend(src, self.self_attn, self.norm1, self.residual1, attn_mask=src_mask,
                         key_padding_mask=src_key_padding_mask, is_causal=is_causal)
        return self._feedforward(x)


@dataclass
class DecoderLayerCache:
    """Caches of one decoder layer: self-attention keys/values (growing) and cross-attention (static)."""

    self_attn: KVCache = field(default_factory=KVCache)
    cross_attn: KVCache = field(default_factory=lambda: KVCache(static=True))

    @property
    def length(self) -> int:
        return self.self_attn.length


class _DecoderLayer(_Block):
    def __init__(self, embed_dim: int, num_heads: int, ffn_dim: Optional[int] = None, *, dropout: float = 0.0,
                 activation: Optional[Callable] = None, curvature: CurvatureArg = 1.0,
                 learnable_curvature: bool = False, batch_first: bool = True, cross_attention: bool = True,
                 memory_dim: Optional[int] = None, check_inputs: bool = True, **attn_kwargs):
        super().__init__(embed_dim, num_heads, ffn_dim, dropout=dropout, activation=activation, curvature=curvature,
                         learnable_curvature=learnable_curvature, batch_first=batch_first,
                         check_inputs=check_inputs, attn_kwargs=attn_kwargs, cross_attention=cross_attention,
                         memory_dim=memory_dim)

    def forward(self, tgt: torch.Tensor, memory: Optional[torch.Tensor] = None,
                tgt_mask: Optional[torch.Tensor] = None, memory_mask: Optional[torch.Tensor] = None,
                tgt_key_padding_mask: Optional[torch.Tensor] = None,
                memory_key_padding_mask: Optional[torch.Tensor] = None, tgt_is_causal: bool = True,
                cache: Optional[DecoderLayerCache] = None) -> torch.Tensor:
        self._check(tgt, self.embed_dim, "tgt")
        x = self._attend(tgt, self.self_attn, self.norm1, self.residual1, attn_mask=tgt_mask,
                         key_padding_mask=tgt_key_padding_mask, is_causal=tgt_is_causal,
                         cache=None if cache is None else cache.self_attn)
        if self.cross_attn is not None:
            cross_cache = None if cache is None else cache.cross_attn
            if memory is None and (cross_cache is None or cross_cache.length == 0):
                raise ValueError(f"{type(self).__name__}: this layer has cross-attention and needs memory (or "
                                 "build it with cross_attention=False for a decoder-only model)")
            if memory is not None:
                self._check(memory, self.memory_dim, "memory")
            x = self._attend(x, self.cross_attn, self.norm_cross, self.residual_cross, memory, memory,
                             attn_mask=memory_mask, key_padding_mask=memory_key_padding_mask, cache=cross_cache)
        return self._feedforward(x)


_ENCODER_LAYER_DOC = r"""Pre-norm {model} encoder layer: x ← R(x, attn(LN(x))); x ← R(x, FFN(LN(x))).

    See the module docstring for the construction and the papers. Arguments as
    ``nn.TransformerEncoderLayer`` where they exist (``embed_dim`` = d_model, counting {dims};
    ``ffn_dim`` = dim_feedforward, default 4·embed_dim; ``batch_first`` default True); the other
    keyword arguments (``num_kv_heads``, {attn_options}``per_head_curvature``, ``learnable_scale``,
    ``attn_backend``) go to :class:`{attention}`.

    ``forward(src, src_mask=None, src_key_padding_mask=None, is_causal=False)``: ``src``
    ``(B, N, {shape})`` → same shape. Masks follow ``nn.MultiheadAttention`` (bool True = may NOT
    attend; key padding True = padded).
    """

_DECODER_LAYER_DOC = r"""Pre-norm {model} decoder layer: causal self-attention, optional cross-attention, FFN.

    x ← R(x, self_attn(LN(x))); x ← R(x, cross_attn(LN(x), memory)) if ``cross_attention``;
    x ← R(x, FFN(LN(x))). With ``cross_attention=False`` it is a decoder-only (GPT-style) block.
    Arguments as the encoder layer, plus ``cross_attention`` (default True) and ``memory_dim``.

    ``forward(tgt, memory=None, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
    memory_key_padding_mask=None, tgt_is_causal=True, cache=None)``: ``tgt`` ``(B, N, {shape})``,
    ``memory`` ``(B, S, memory_dim{plus})``. ``cache`` (:class:`DecoderLayerCache`) enables incremental
    decoding: pass only the new tokens; ``tgt_key_padding_mask`` then covers all cached positions.
    """

_LORENTZ_FMT = dict(model="Lorentz", dims="space dimensions (tensors carry one more, the time)",
                    attn_options="``score`` (incl. ``\"linear\"``), ``tau``, ``beta``, ``squared``, ``power``, ``projection``, ",
                    attention="HyperbolicMultiheadAttention", shape="embed_dim + 1", plus=" + 1")
_POINCARE_FMT = dict(model="Poincaré", dims="ball dimensions", attn_options="``beta``, ``squared``, ",
                     attention="PoincareMultiheadAttention", shape="embed_dim", plus="")


class LorentzTransformerEncoderLayer(_EncoderLayer):
    __doc__ = _ENCODER_LAYER_DOC.format(**_LORENTZ_FMT)
    kit = LORENTZ


class LorentzTransformerDecoderLayer(_DecoderLayer):
    __doc__ = _DECODER_LAYER_DOC.format(**_LORENTZ_FMT)
    kit = LORENTZ


class PoincareTransformerEncoderLayer(_EncoderLayer):
    __doc__ = _ENCODER_LAYER_DOC.format(**_POINCARE_FMT)
    kit = POINCARE


class PoincareTransformerDecoderLayer(_DecoderLayer):
    __doc__ = _DECODER_LAYER_DOC.format(**_POINCARE_FMT)
    kit = POINCARE


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


class _Stack(nn.Module):
    """Layers applied in turn, with curvature hand-over between layers and an optional final norm."""

    layer_cls: type

    def __init__(self, num_layers: int, embed_dim: int, num_heads: int, ffn_dim: Optional[int] = None, *,
                 curvature: CurvatureArg = 1.0, learnable_curvature: Union[bool, str] = False,
                 final_norm: bool = True, batch_first: bool = True, check_inputs: bool = True, **layer_kwargs):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"{type(self).__name__}: num_layers must be ≥ 1, got {num_layers}")
        self.embed_dim, self.batch_first, self.check_inputs = embed_dim, batch_first, check_inputs
        self.input_curvature, curvatures = _stack_curvatures(num_layers, curvature, learnable_curvature)
        self.layers = nn.ModuleList(
            self.layer_cls(embed_dim, num_heads, ffn_dim, curvature=c, batch_first=batch_first, check_inputs=False,
                           **layer_kwargs)
            for c in curvatures
        )
        norm = self.layer_cls.kit.norm
        self.norm = norm(embed_dim, curvature=curvatures[-1], check_inputs=False) if final_norm else None

    @property
    def curvature(self) -> Curvature:
        """The curvature of the stack's input."""
        return self.input_curvature

    @property
    def output_curvature(self) -> Curvature:
        return self.layers[-1].curvature

    def _check(self, x: torch.Tensor, name: str) -> None:
        self.layer_cls.kit.check(x, self.embed_dim, self.curvature(), name=name, layer=type(self).__name__,
                                 check_manifold=self.check_inputs)

    def _run(self, x: torch.Tensor, call) -> torch.Tensor:
        prev = self.input_curvature
        for i, layer in enumerate(self.layers):
            if layer.curvature is not prev:
                x = rescale(x, prev(), layer.curvature())
            x = call(i, layer, x)
            prev = layer.curvature
        return x if self.norm is None else self.norm(x)


class _Encoder(_Stack):
    def forward(self, src: torch.Tensor, mask: Optional[torch.Tensor] = None,
                src_key_padding_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
        self._check(src, "src")
        return self._run(src, lambda i, layer, x: layer(x, mask, src_key_padding_mask, is_causal))


class _Decoder(_Stack):
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


_STACK_DOC = r"""A stack of :class:`{layer}` with an optional final {model} LayerNorm.

    ``{name}(num_layers, embed_dim, num_heads, ffn_dim=None, *, curvature=1.0, learnable_curvature=False,
    final_norm=True, batch_first=True, check_inputs=True, **layer_kwargs)``; curvature modes in the
    module docstring. {forward}
    """

_ENCODER_FORWARD = ("``forward(src, mask=None, src_key_padding_mask=None, is_causal=False)``: ``(B, N, {shape})`` "
                    "on ``curvature`` → same shape on ``output_curvature``.")
_DECODER_FORWARD = ("``forward(tgt, memory=None, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None, "
                    "memory_key_padding_mask=None, tgt_is_causal=True, cache=None)``; ``memory`` is taken on the "
                    "stack's input curvature and handed to each layer's. Layer options ``cross_attention`` "
                    "(False = decoder-only) and ``memory_dim``. Incremental decoding: ``cache = "
                    "decoder.new_cache()``, then call with the new tokens only (O(past) work per token).")


def _stack_doc(name, layer, fmt, forward):
    return _STACK_DOC.format(name=name, layer=layer, model=fmt["model"], forward=forward.format(shape=fmt["shape"]))


class LorentzTransformerEncoder(_Encoder):
    __doc__ = _stack_doc("LorentzTransformerEncoder", "LorentzTransformerEncoderLayer", _LORENTZ_FMT, _ENCODER_FORWARD)
    layer_cls = LorentzTransformerEncoderLayer


class LorentzTransformerDecoder(_Decoder):
    __doc__ = _stack_doc("LorentzTransformerDecoder", "LorentzTransformerDecoderLayer", _LORENTZ_FMT, _DECODER_FORWARD)
    layer_cls = LorentzTransformerDecoderLayer


class PoincareTransformerEncoder(_Encoder):
    __doc__ = _stack_doc("PoincareTransformerEncoder", "PoincareTransformerEncoderLayer", _POINCARE_FMT,
                         _ENCODER_FORWARD)
    layer_cls = PoincareTransformerEncoderLayer


class PoincareTransformerDecoder(_Decoder):
    __doc__ = _stack_doc("PoincareTransformerDecoder", "PoincareTransformerDecoderLayer", _POINCARE_FMT,
                         _DECODER_FORWARD)
    layer_cls = PoincareTransformerDecoderLayer
