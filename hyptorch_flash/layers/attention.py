"""Hyperbolic multi-head attention modules on top of :func:`hyptorch_flash.hyperbolic_attention`."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .. import geometry
from ..ops import hyperbolic_attention, hyperbolic_attention_weights, linear_attention_with_state
from . import ball
from .cache import KVCache
from .curvature import Curvature, CurvatureArg, as_curvature
from .linear import LorentzLinear
from .masks import module_masks_to_sdpa
from .poincare import PoincareLinear
from .points import check_ball_points, check_points, lorentz_point
from .positional import rotary as apply_rotary

LORENTZ_SCORES = ("lorentz_dot", "distance", "linear")
OUTPUT_CHARTS = ("lorentz", "klein", "poincare")


def _positive_head_parameter(module: nn.Module, name: str, value: float, num_heads: int, learnable: bool) -> None:
    """Register log(value) per head as a parameter (learnable) or a buffer; read back with exp."""
    log_value = torch.full((num_heads,), math.log(value), dtype=torch.get_default_dtype())
    if learnable:
        module.register_parameter(name, nn.Parameter(log_value))
    else:
        module.register_buffer(name, log_value)


class _MultiheadAttention(nn.Module):
    """The nn.MultiheadAttention-style shell shared by the Lorentz and Poincaré modules.

    Subclasses set the projections and three hooks: ``_check_input`` (shape/manifold of an input),
    ``_split`` (inputs → heads ``(B, h, N, head_dim)`` for the functional op) and ``_merge`` (per-head
    outputs → module output); ``core_output`` is the functional op's ``output=``.
    """

    core_output = "lorentz"

    def __init__(self, embed_dim, num_heads, *, num_kv_heads, kdim, vdim, batch_first, curvature,
                 learnable_curvature, per_head_curvature, score, scores, tau, beta, squared, learnable_scale,
                 attn_backend, check_inputs, rotary, rotary_base, power=2.0):
        super().__init__()
        name = type(self).__name__
        if embed_dim < 1 or num_heads < 1 or embed_dim % num_heads:
            raise ValueError(f"{name}: embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"{name}: num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if score not in scores:
            raise ValueError(f"{name}: score must be one of {scores}, got {score!r}"
                             + (" (use PoincareMultiheadAttention for poincare_distance)" if score == "poincare_distance" else ""))
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = self.kdim if vdim is None else vdim
        self.batch_first, self.score, self.squared = batch_first, score, squared
        self.attn_backend, self.check_inputs = attn_backend, check_inputs
        self.rotary, self.rotary_base = rotary, rotary_base
        self.curvature = as_curvature(curvature, learnable=learnable_curvature)
        if per_head_curvature:
            self.head_curvature = Curvature(self.curvature().detach(), learnable=True, num_heads=num_heads)
        else:
            self.head_curvature = self.curvature
        if score == "lorentz_dot":
            tau = math.sqrt(self.head_dim) if tau is None else tau
            if not tau > 0:
                raise ValueError(f"{name}: tau must be > 0, got {tau}")
            _positive_head_parameter(self, "log_coef", 2.0 / tau, num_heads, learnable_scale)
        elif score == "linear":
            if not power > 0:
                raise ValueError(f"{name}: power must be > 0, got {power}")
            _positive_head_parameter(self, "log_coef", power, num_heads, learnable_scale)
        else:
            if not beta > 0:
                raise ValueError(f"{name}: beta must be > 0, got {beta}")
            _positive_head_parameter(self, "log_coef", beta, num_heads, learnable_scale)

    def _score_kwargs(self) -> dict:
        coef = self.log_coef.exp()
        if self.score == "lorentz_dot":
            return {"scale": coef}
        if self.score == "linear":
            return {"power": coef}
        return {"beta": coef, "squared": self.squared}

    def _value_map(self, self_attention: bool):
        # Hypformer's value-mapping term belongs to a query's own token: self-attention only
        return getattr(self, "value_map", None) if self_attention else None

    def forward(self, query: torch.Tensor, key: Optional[torch.Tensor] = None, value: Optional[torch.Tensor] = None,
                key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = False,
                attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False, cache: Optional[KVCache] = None):
        name = type(self).__name__
        self_attention = key is None and value is None
        key = query if key is None else key
        value = key if value is None else value
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) if isinstance(t, torch.Tensor) and t.dim() == 3 else t
                                 for t in (query, key, value))
        if not isinstance(query, torch.Tensor) or query.dim() != 3:
            raise ValueError(f"{name}: query must be 3-D (batch, seq, features) with batch_first="
                             f"{self.batch_first}, got shape {tuple(getattr(query, 'shape', ()))}")
        self._check_input(query, self.embed_dim, "query")
        recurrent = self.score == "linear" and cache is not None and not cache.static
        if recurrent and (attn_mask is not None or need_weights):
            raise ValueError(f"{name}: score='linear' with a KVCache keeps only the recurrent state (no keys), so "
                             "attn_mask and need_weights are not available there; use key_padding_mask")
        reuse_static = cache is not None and cache.static and cache.length > 0
        if not reuse_static and not self_attention:
            self._check_input(key, self.kdim, "key")
            if value is not key:
                self._check_input(value, self.vdim, "value")
            if key.dim() != 3 or key.shape[:2] != value.shape[:2] or key.shape[0] != query.shape[0]:
                raise ValueError(f"{name}: key {tuple(key.shape)} and value {tuple(value.shape)} must be "
                                 f"(batch, seq, features) with the query's batch ({query.shape[0]})")
        B, N = query.shape[:2]
        head_k = self.head_curvature()
        q = self._split(self.q_proj, query, self.num_heads, head_k)
        if reuse_static:
            k_heads, v_heads = cache.key, cache.value
        else:
            k_heads = self._split(self.k_proj, key, self.num_kv_heads, head_k)
            v_heads = self._split(self.v_proj, value, self.num_kv_heads, head_k)
            if self.rotary and self_attention:
                start = cache.length if cache is not None else 0
                positions = torch.arange(start, start + N, device=q.device)
                q = apply_rotary(q, positions, base=self.rotary_base)
                k_heads = apply_rotary(k_heads, positions, base=self.rotary_base)
            if recurrent:
                out = linear_attention_with_state(
                    q, k_heads, v_heads, cache.linear_state(), causal=is_causal, curvature=head_k,
                    value_map=self._value_map(self_attention), output=self.core_output, check_inputs=False,
                    key_padding_mask=None if key_padding_mask is None else key_padding_mask[:, -N:],
                    **self._score_kwargs())
                y = self._merge(out, head_k)
                return (y if self.batch_first else y.transpose(0, 1)), None
            if cache is not None:
                k_heads, v_heads = cache.update(k_heads, v_heads)
        M = k_heads.shape[2]
        past = M - N if (cache is not None and not cache.static) else 0
        causal, sdpa_mask = module_masks_to_sdpa(attn_mask, is_causal=is_causal, past=past, batch=B,
                                                 num_heads=self.num_heads, q_len=N, k_len=M, layer=name)
        common = dict(score=self.score, curvature=head_k, causal=causal, attn_mask=sdpa_mask,
                      key_padding_mask=key_padding_mask, check_inputs=False, **self._score_kwargs())
        out = hyperbolic_attention(q, k_heads, v_heads, output=self.core_output, backend=self.attn_backend,
                                   value_map=self._value_map(self_attention and M == N), **common)
        y = self._merge(out, head_k)
        if not self.batch_first:
            y = y.transpose(0, 1)
        weights = None
        if need_weights:
            weights = hyperbolic_attention_weights(q, k_heads, **common)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        return y, weights

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"score={self.score!r}, attn_backend={self.attn_backend!r}")


class HyperbolicMultiheadAttention(_MultiheadAttention):
    r"""Multi-head attention between points of H^embed_dim_k, in the Lorentz model.

    Queries, keys and values are Lorentz linear maps of the inputs (:class:`LorentzLinear`, Hypformer /
    HyperCore "space" form by default, HyboNet's with ``projection="hybonet"``), split into heads of
    ``head_dim = embed_dim // num_heads`` space coordinates each, i.e. points of H^head_dim_{k_h}. The
    core is the functional :func:`hyptorch_flash.hyperbolic_attention` (so every backend — reference,
    blockwise, cuda — runs through this module): softmax of a hyperbolic score, then the Lorentz
    centroid of the values (Chen et al. 2022, "Fully Hyperbolic Neural Networks", ACL, §3.2 for
    ``score="lorentz_dot"``: s = (2/τ)<q,k>_L; Gulcehre et al. 2019, "Hyperbolic Attention Networks",
    ICLR, for ``score="distance"``: s = −β·d(q,k), or −β·d² with ``squared=True``). With
    ``score="linear"`` it is Hypformer's focused linear attention instead (Yang et al. 2024, KDD; see
    :mod:`hyptorch_flash.ops.linear_attention`): kernel weights φ(q)·φ(k) with focusing power ``power``
    (per head, learnable with ``learnable_scale``), the weighted mean of the values' space parts plus
    Hypformer's value-mapping term ``value_map`` (an ``nn.Linear`` on each head's value, self-attention
    only), O(N) time and memory; with a ``KVCache`` it decodes from a recurrent state (Σφ(k)v, Σφ(k))
    instead of stored keys, O(1) per token. The heads' space
    parts are concatenated (a point of H^embed_dim_k once its time is recomputed) and mapped by an
    output :class:`LorentzLinear`.

    Representation: inputs and outputs are full Lorentz points ``(..., embed_dim + 1)`` (time first);
    ``kdim``/``vdim`` likewise count space dimensions. ``output`` selects the chart of the *returned*
    tensor: ``"lorentz"`` (full points, default; what the other layers take), ``"klein"`` or
    ``"poincare"`` (``(..., embed_dim)`` in the Klein ball of radius sqrt(k) / geoopt
    ``PoincareBall(c=1/k)``) — the same point in another chart.

    Interface of ``nn.MultiheadAttention`` (differences marked):

    - ``batch_first`` (default **True** here): ``(B, N, E+1)``, else ``(N, B, E+1)``.
    - ``attn_mask``: as ``nn.MultiheadAttention``: bool **True = may NOT attend**, or float added to
      the scores; shape ``(N, M)`` or ``(B·num_heads, N, M)``. (The functional op follows
      ``F.scaled_dot_product_attention``, bool True = *may* attend; this module converts.)
    - ``key_padding_mask``: bool ``(B, M)``, True = padded key. ``is_causal``: query i sees keys
      j ≤ i (with a cache: j ≤ past + i). Rows that see no key return the origin.
    - ``need_weights`` (default **False** here, since weights cost O(N·M) memory): also return the
      attention weights ``(B, N, M)`` (head-averaged) or ``(B, H, N, M)`` from
      :func:`hyptorch_flash.hyperbolic_attention_weights` (reference math); else ``None``.
    - ``key``/``value`` default to ``query`` (self-attention).

    Extras: ``num_kv_heads`` (GQA/MQA), ``per_head_curvature`` (a learnable k_h > 0 per head, the
    heads' own hyperboloids), ``learnable_scale`` (per-head learnable τ or β, kept positive),
    ``rotary`` (hyperbolic rotary position embedding of queries and keys in self-attention, see
    :func:`hyptorch_flash.layers.positional.rotary`; positions continue across cached calls),
    ``attn_backend`` (``None`` = context manager / ``$HYPTORCH_FLASH_BACKEND`` / auto; see
    :func:`hyptorch_flash.set_attention_backend`), and ``cache=`` (:class:`KVCache`) for incremental
    decoding: each call appends the new keys/values, so a decoding step costs O(past length).

    Returns ``(output, weights_or_None)`` like ``nn.MultiheadAttention``.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, num_kv_heads: Optional[int] = None,
                 kdim: Optional[int] = None, vdim: Optional[int] = None, batch_first: bool = True,
                 curvature: CurvatureArg = 1.0, learnable_curvature: bool = False,
                 per_head_curvature: bool = False, score: str = "lorentz_dot", output: str = "lorentz",
                 tau: Optional[float] = None, beta: float = 1.0, squared: bool = False, power: float = 2.0,
                 learnable_scale: bool = False, bias: bool = True, projection: str = "space",
                 rotary: bool = False, rotary_base: float = 10000.0, attn_backend: Optional[str] = None,
                 check_inputs: bool = True):
        super().__init__(embed_dim, num_heads, num_kv_heads=num_kv_heads, kdim=kdim, vdim=vdim,
                         batch_first=batch_first, curvature=curvature, learnable_curvature=learnable_curvature,
                         per_head_curvature=per_head_curvature, score=score, scores=LORENTZ_SCORES, tau=tau,
                         beta=beta, squared=squared, learnable_scale=learnable_scale, attn_backend=attn_backend,
                         check_inputs=check_inputs, rotary=rotary, rotary_base=rotary_base, power=power)
        if output not in OUTPUT_CHARTS:
            raise ValueError(f"{type(self).__name__}: output must be one of {OUTPUT_CHARTS}, got {output!r}")
        self.output = output
        proj = dict(curvature=self.curvature, bias=bias, mode=projection, check_inputs=False)
        self.q_proj = LorentzLinear(embed_dim, num_heads * self.head_dim, **proj)
        self.k_proj = LorentzLinear(self.kdim, self.num_kv_heads * self.head_dim, **proj)
        self.v_proj = LorentzLinear(self.vdim, self.num_kv_heads * self.head_dim, **proj)
        self.out_proj = LorentzLinear(num_heads * self.head_dim, embed_dim, **proj)
        if score == "linear":  # Hypformer's v_map_mlp: one Linear on each head's value space part
            self.value_map = nn.Linear(self.head_dim, self.head_dim, bias=bias)

    def _check_input(self, x: torch.Tensor, dim: int, name: str) -> None:
        check_points(x, dim, self.curvature(), name=name, layer=type(self).__name__, check_manifold=self.check_inputs)

    def _split(self, proj: LorentzLinear, x: torch.Tensor, heads: int, head_k: torch.Tensor) -> torch.Tensor:
        B, N = x.shape[:2]
        return proj.space(x).reshape(B, N, heads, self.head_dim).transpose(1, 2)  # (B, N, h·dh) → (B, h, N, dh)

    def _merge(self, out: torch.Tensor, head_k: torch.Tensor) -> torch.Tensor:
        B, _, N, _ = out.shape
        k = self.curvature()
        out = out.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)  # (B, H, N, dh) → (B, N, H·dh)
        y = self.out_proj(lorentz_point(out, k))
        if self.output == "klein":
            return geometry.lorentz_to_klein(y, k)
        if self.output == "poincare":
            return geometry.lorentz_to_poincare(y, k)
        return y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, output={self.output!r}"


class PoincareMultiheadAttention(_MultiheadAttention):
    r"""Multi-head attention between points of the Poincaré ball, after HNN++ (Shimizu, Mukuta, Harada 2021,
    "Hyperbolic Neural Networks++", ICLR, §3.3–3.4).

    Queries, keys and values are :class:`PoincareLinear` maps, split into heads by the Poincaré β-split;
    the core is :func:`hyptorch_flash.hyperbolic_attention` with ``score="poincare_distance"``
    (s = −β·d_c(q, k), or −β·d² with ``squared=True``) and ``output="poincare"`` (the Möbius
    gyromidpoint of the values, HNN++'s weighted midpoint); heads are joined by β-concatenation and
    mapped by an output :class:`PoincareLinear`. Points live in geoopt ``PoincareBall(c=1/k)``.

    Shapes: ``(B, N, embed_dim)`` ball points (``batch_first=True``, default) → same. The interface
    (masks in the ``nn.MultiheadAttention`` convention, ``key_padding_mask``, ``is_causal``,
    ``need_weights``, ``num_kv_heads``, ``per_head_curvature``, ``learnable_scale``, ``rotary``,
    ``attn_backend``, ``cache=``) is that of :class:`HyperbolicMultiheadAttention`. ``per_head_curvature`` needs
    ``num_kv_heads == num_heads`` (a shared key head would have to lie in several balls).
    """

    core_output = "poincare"

    def __init__(self, embed_dim: int, num_heads: int, *, num_kv_heads: Optional[int] = None,
                 kdim: Optional[int] = None, vdim: Optional[int] = None, batch_first: bool = True,
                 curvature: CurvatureArg = 1.0, learnable_curvature: bool = False,
                 per_head_curvature: bool = False, beta: float = 1.0, squared: bool = False,
                 learnable_scale: bool = False, bias: bool = True, rotary: bool = False,
                 rotary_base: float = 10000.0, attn_backend: Optional[str] = None, check_inputs: bool = True):
        super().__init__(embed_dim, num_heads, num_kv_heads=num_kv_heads, kdim=kdim, vdim=vdim,
                         batch_first=batch_first, curvature=curvature, learnable_curvature=learnable_curvature,
                         per_head_curvature=per_head_curvature, score="poincare_distance",
                         scores=("poincare_distance",), tau=None, beta=beta, squared=squared,
                         learnable_scale=learnable_scale, attn_backend=attn_backend, check_inputs=check_inputs,
                         rotary=rotary, rotary_base=rotary_base)
        if per_head_curvature and self.num_kv_heads != num_heads:
            raise ValueError(f"{type(self).__name__}: per_head_curvature needs num_kv_heads == num_heads")
        proj = dict(curvature=self.curvature, bias=bias, check_inputs=False)
        self.q_proj = PoincareLinear(embed_dim, embed_dim, **proj)
        self.k_proj = PoincareLinear(self.kdim, self.num_kv_heads * self.head_dim, **proj)
        self.v_proj = PoincareLinear(self.vdim, self.num_kv_heads * self.head_dim, **proj)
        self.out_proj = PoincareLinear(embed_dim, embed_dim, **proj)

    def _check_input(self, x: torch.Tensor, dim: int, name: str) -> None:
        check_ball_points(x, dim, self.curvature(), name=name, layer=type(self).__name__,
                          check_manifold=self.check_inputs)

    def _split(self, proj: PoincareLinear, x: torch.Tensor, heads: int, head_k: torch.Tensor) -> torch.Tensor:
        return ball.beta_split(proj(x), heads, self.curvature(), geometry.heads_view(head_k))

    def _merge(self, out: torch.Tensor, head_k: torch.Tensor) -> torch.Tensor:
        return self.out_proj(ball.beta_concat(out, geometry.heads_view(head_k), self.curvature()))
