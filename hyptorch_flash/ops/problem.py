"""Validation of an attention call and the normalised description every backend receives."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .. import geometry, numerics
from .focused_linear import DEFAULT_POWER, space_epilogue
from .masks import MaskSpec
from .scores import ScoreVariant, get_variant


LORENTZ_SCORES = ("lorentz_dot", "distance", "linear")  # inputs are space coordinates of Lorentz points


def _err(msg: str) -> ValueError:
    return ValueError(f"hyptorch_flash.hyperbolic_attention: {msg}")


@dataclass
class AttentionProblem:
    """One validated attention call.

    ``q`` ``(B, H, N, D)``, ``k`` ``(B, Hkv, M, D)``, ``v`` ``(B, Hkv, M, Dv)``: space coordinates
    (Poincaré ball points for ``poincare_distance``, plain vectors for ``euclidean``), all of one
    dtype and device; H is a multiple of Hkv (GQA/MQA). ``curvature`` and ``coef`` are 0-d or
    ``(H,)`` tensors (k > 0; ``coef`` is the score's scale, β, or the focusing power p of ``linear``).
    ``full_output`` asks for the Lorentz output with its time coordinate, ``(B, H, N, Dv+1)``.
    ``value_map`` (``linear`` only, N = M): Hypformer's value-mapping term, added per query to the
    output's space part before the time coordinate is recomputed. ``out_dtype``: the output's dtype
    (default: the inputs').
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    variant: ScoreVariant
    output: str
    curvature: torch.Tensor
    coef: torch.Tensor
    squared: bool
    acosh_eps: Optional[float]
    mask: MaskSpec
    full_output: bool = False
    return_lse: bool = False  # the caller receives the LSE (and may differentiate through it)
    value_map: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    out_dtype: Optional[torch.dtype] = None

    def __post_init__(self):
        if self.out_dtype is None:
            self.out_dtype = self.q.dtype

    @property
    def num_heads(self) -> int:
        return self.q.shape[1]

    @property
    def group_size(self) -> int:
        return self.q.shape[1] // self.k.shape[1]

    @property
    def compute_dtype(self) -> torch.dtype:
        return numerics.compute_dtype(self.q.dtype)

    def acosh_margin(self) -> float:
        return numerics.acosh_margin(self.compute_dtype) if self.acosh_eps is None else self.acosh_eps

    def expanded(self):
        """Inputs for the PyTorch backends, in the compute dtype with K/V heads expanded to H.

        Returns ``q (B,H,N,D)``, ``k (B,H,M,D)``, ``v_lifted (B,H,M,Dv')`` (Lorentz coordinates for the
        hyperbolic variants, Dv' = Dv + 1), and the curvature and coefficient as ``(1,H,1,1)`` or 0-d.
        Everything stays differentiable with respect to the user's tensors.
        """
        dt = self.compute_dtype
        curv = geometry.heads_view(self.curvature.to(dt))
        coef = geometry.heads_view(self.coef.to(dt))
        q, k, v = (x.to(dt) for x in (self.q, self.k, self.v))
        if self.group_size > 1:
            k = k.repeat_interleave(self.group_size, dim=1)
            v = v.repeat_interleave(self.group_size, dim=1)
        return q, k, self.variant.lift_values(v, curv), curv, coef

    def score_kwargs(self) -> dict:
        """Keyword arguments of the variant's score functor for this call."""
        return {"squared": self.squared, "acosh_eps": self.acosh_margin()}

    def finish(self, o: torch.Tensor) -> torch.Tensor:
        """Epilogue shared by the PyTorch backends: ``o`` = Σ_j P_ij·lift(v_j) → output in ``out_dtype``."""
        if self.output == "euclidean":
            return o.to(self.out_dtype)
        curv = geometry.heads_view(self.curvature.to(o.dtype))
        if self.variant.aggregation == "space":  # o = Σ_j w_ij v_j (space coordinates), Hypformer
            if self.value_map is not None:
                o = o + self.value_term().to(o.dtype)
            return space_epilogue(o, curv, self.output, self.full_output).to(self.out_dtype)
        y = geometry.centroid_epilogue(o, curv, self.output)
        if self.full_output:
            y = geometry.lift(y, curv)
        return y.to(self.out_dtype)


    def value_term(self) -> torch.Tensor:
        """``value_map(v)`` expanded to the query heads, ``(B, H, M, Dv)``; checks its shape."""
        mapped = self.value_map(self.v)
        if not isinstance(mapped, torch.Tensor) or mapped.shape != self.v.shape:
            raise _err(
                f"value_map must map v of shape {tuple(self.v.shape)} to a tensor of the same shape, "
                f"got {tuple(getattr(mapped, 'shape', ())) or type(mapped).__name__}"
            )
        return mapped.repeat_interleave(self.group_size, dim=1) if self.group_size > 1 else mapped


def _check_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"hyptorch_flash.hyperbolic_attention: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise _err(f"{name} must be 4-D (batch, heads, seq, dim), got shape {tuple(x.shape)}")
    if x.dtype not in numerics.FLOAT_DTYPES:
        raise TypeError(
            f"hyptorch_flash.hyperbolic_attention: {name} has dtype {x.dtype}; supported dtypes are "
            f"{[str(d) for d in numerics.FLOAT_DTYPES]}"
        )


def _check_finite(name: str, x: torch.Tensor) -> None:
    if not bool(torch.isfinite(x).all()):
        bad = (~torch.isfinite(x)).sum().item()
        raise _err(
            f"{name} of shape {tuple(x.shape)} has {bad} NaN/Inf entries "
            "(pass check_inputs=False to skip this check)"
        )


def _check_in_ball(name: str, p: torch.Tensor, curvature: torch.Tensor) -> None:
    c = 1.0 / geometry.heads_view(curvature.detach().to(numerics.compute_dtype(p.dtype)))
    radius_sq = c * geometry.sq_norm(p.detach().to(c.dtype))
    if bool((radius_sq >= 1.0).any()):
        raise _err(
            f"{name} of shape {tuple(p.shape)} has points outside the Poincaré ball c|p|² < 1 "
            f"(c = 1/curvature): max c|p|² = {radius_sq.max().item():.6g}"
        )


def _resolve_coefficient(variant: ScoreVariant, head_dim: int, tau, scale, beta, power, device) -> torch.Tensor:
    if power is not None and variant.coefficient != "power":
        raise _err(f"power applies to score='linear', not to score={variant.name!r}")
    if variant.coefficient == "power":
        if tau is not None or scale is not None or beta is not None:
            raise _err(
                "tau/scale/beta do not apply to score='linear' (its kernel weights are normalised, so a "
                "scale cancels; the focusing power is power=)"
            )
        value = DEFAULT_POWER if power is None else power
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not value > 0:
            raise _err(f"power must be > 0, got {value}")
    elif variant.coefficient == "scale":
        if beta is not None:
            raise _err(f"beta applies to distance scores, not to score={variant.name!r} (use tau or scale)")
        if tau is not None and scale is not None:
            raise _err("give tau or scale, not both")
        if scale is not None:
            value = scale
        else:
            tau = math.sqrt(head_dim) if tau is None else tau
            if isinstance(tau, (int, float)) and tau <= 0:
                raise _err(f"tau must be > 0, got {tau}")
            # lorentz_dot: s = (2/τ)<q,k>_L (HyboNet); euclidean: s = q·k/τ (SDPA with τ = sqrt(D))
            value = (2.0 if variant.name == "lorentz_dot" else 1.0) / tau
    else:
        if tau is not None or scale is not None:
            raise _err(f"tau/scale apply to dot-product scores, not to score={variant.name!r} (use beta)")
        value = 1.0 if beta is None else beta
    if isinstance(value, torch.Tensor):
        if value.dim() > 1:
            raise _err(f"{variant.coefficient} must be a float, a 0-d or an (H,) tensor, got shape {tuple(value.shape)}")
        if value.device != device and value.dim() > 0:
            raise _err(f"{variant.coefficient} is on {value.device} but the inputs are on {device}")
        return value.to(device)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _err(f"{variant.coefficient} must be a finite number or a tensor, got {value!r}")
    return geometry.scalar_tensor(value, device)


def _normalise_attn_mask(attn_mask, B, H, N, M, device) -> torch.Tensor:
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"hyptorch_flash.hyperbolic_attention: attn_mask must be a tensor, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(
            f"hyptorch_flash.hyperbolic_attention: attn_mask must be bool (True = may attend) or "
            f"float (added to the scores), got {attn_mask.dtype}"
        )
    if attn_mask.device != device:
        raise _err(f"attn_mask is on {attn_mask.device} but the inputs are on {device}")
    try:
        if attn_mask.dim() > 4 or torch.broadcast_shapes(attn_mask.shape, (B, H, N, M)) != (B, H, N, M):
            raise RuntimeError
    except RuntimeError:
        raise _err(
            f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to (B, H, N, M) = {(B, H, N, M)}"
        ) from None
    return attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))


def build_problem(
    q, k, v, *, score, output, curvature, tau, scale, beta, squared, causal, attn_mask,
    key_padding_mask, full_lorentz, check_inputs, acosh_eps, return_lse=False, power=None, value_map=None,
    out_dtype=None,
) -> AttentionProblem:
    """Validate the arguments of :func:`hyperbolic_attention` and return the problem description."""
    variant = get_variant(score)
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, x)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            f"hyptorch_flash.hyperbolic_attention: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if not (q.device == k.device == v.device):
        raise _err(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    output = variant.default_output if output is None else output
    if output not in variant.outputs:
        raise _err(f"output={output!r} is not available for score={variant.name!r}; choose from {variant.outputs}")
    if full_lorentz and variant.name not in LORENTZ_SCORES:
        raise _err(f"full_lorentz=True needs a Lorentz score {LORENTZ_SCORES}, not {variant.name!r}")

    B, H, N, _ = q.shape
    curv = geometry.resolve_curvature(curvature, num_heads=H, device=q.device, check=check_inputs)
    if full_lorentz:
        if curv.dim() == 1 and curv.shape[0] > 1 and k.shape[1] != H:
            raise _err("full_lorentz=True with GQA/MQA needs a scalar curvature (a shared key lies on one manifold)")
        kh = geometry.heads_view(curv.detach())
        q = geometry.split_lorentz(q, kh, name="q", check=check_inputs)
        k = geometry.split_lorentz(k, kh, name="k", check=check_inputs)
        v = geometry.split_lorentz(v, kh, name="v", check=check_inputs)

    Bk, Hkv, M, Dk = k.shape
    if Bk != B or v.shape[0] != B:
        raise _err(f"batch sizes differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if Dk != q.shape[-1]:
        raise _err(f"q and k head dims differ: q {tuple(q.shape)}, k {tuple(k.shape)}")
    if v.shape[1:3] != k.shape[1:3]:
        raise _err(f"k and v must have the same heads and length: k {tuple(k.shape)}, v {tuple(v.shape)}")
    if Hkv < 1 or H % Hkv != 0:
        raise _err(f"query heads ({H}) must be a multiple of key/value heads ({Hkv}) for GQA/MQA")
    if N < 1 or M < 1 or q.shape[-1] < 1 or v.shape[-1] < 1:
        raise _err(f"empty dimensions are not supported: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")

    coef = _resolve_coefficient(variant, q.shape[-1], tau, scale, beta, power, q.device)
    if coef.dim() == 1 and coef.shape[0] not in (1, H):
        raise _err(f"per-head {variant.coefficient} has {coef.shape[0]} entries but the query has {H} heads")

    if attn_mask is not None:
        attn_mask = _normalise_attn_mask(attn_mask, B, H, N, M, q.device)
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise TypeError("hyptorch_flash.hyperbolic_attention: key_padding_mask must be a bool tensor (True = padded key)")
        if tuple(key_padding_mask.shape) != (B, M):
            raise _err(f"key_padding_mask must have shape (B, M) = {(B, M)}, got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.device != q.device:
            raise _err(f"key_padding_mask is on {key_padding_mask.device} but the inputs are on {q.device}")
    if out_dtype is not None and out_dtype not in numerics.FLOAT_DTYPES:
        raise TypeError(f"hyptorch_flash.hyperbolic_attention: out_dtype must be one of {numerics.FLOAT_DTYPES} "
                        f"or None (the inputs' dtype), got {out_dtype!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"hyptorch_flash.hyperbolic_attention: causal must be a bool, got {type(causal).__name__}")
    if acosh_eps is not None and not (isinstance(acosh_eps, (int, float)) and acosh_eps > 0):
        raise _err(f"acosh_eps must be a positive float, got {acosh_eps!r}")
    if value_map is not None:
        if variant.aggregation != "space":
            raise _err(f"value_map is Hypformer's value-mapping term of score='linear', not of score={variant.name!r}")
        if not callable(value_map):
            raise TypeError(f"hyptorch_flash.hyperbolic_attention: value_map must be callable (e.g. an nn.Linear), "
                            f"got {type(value_map).__name__}")
        if N != M:
            raise _err(f"value_map adds the query token's own mapped value, so it needs N = M (self-attention); "
                       f"got q {tuple(q.shape)}, k {tuple(k.shape)}")

    if check_inputs:
        if variant.coefficient == "power" and not bool((coef > 0).all()):
            raise _err(f"power must be > 0, got {coef.tolist()}")
        for name, x in (("q", q), ("k", k), ("v", v)):
            _check_finite(name, x)
        if variant.name == "poincare_distance":
            group = H // Hkv
            for name, x in (("q", q), ("k", k), ("v", v)):
                # a shared GQA head must lie inside the ball of every query head that reads it
                _check_in_ball(name, x if x is q else x.repeat_interleave(group, dim=1), curv)
    return AttentionProblem(
        q=q, k=k, v=v, variant=variant, output=output, curvature=curv, coef=coef,
        squared=bool(squared), acosh_eps=acosh_eps,
        mask=MaskSpec(causal=causal, attn_mask=attn_mask, key_padding_mask=key_padding_mask),
        full_output=bool(full_lorentz) and output == "lorentz", return_lse=bool(return_lse), value_map=value_map,
        out_dtype=out_dtype,
    )
