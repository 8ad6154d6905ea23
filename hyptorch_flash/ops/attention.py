"""The public functional op: :func:`hyperbolic_attention`."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from . import backends
from .problem import build_problem
from .reference import attention_probabilities


def hyperbolic_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    score: str = "lorentz_dot",
    output: Optional[str] = None,
    curvature=1.0,
    tau=None,
    scale=None,
    beta=None,
    squared: bool = False,
    causal: bool = False,
    attn_mask: Optional[torch.Tensor] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    full_lorentz: bool = False,
    return_lse: bool = False,
    backend: Optional[str] = None,
    check_inputs: bool = True,
    acosh_eps: Optional[float] = None,
    power=None,
    value_map: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    out_dtype: Optional[torch.dtype] = None,
):
    r"""Hyperbolic multi-head attention: softmax over a hyperbolic score, centroid aggregation.

    For query i: P_ij = softmax_j(s(q_i, k_j) + mask_ij), O_i = Σ_j P_ij·lift(v_j), output = the
    centroid of the lifted values (DESIGN.md §2), written in the chosen model.

    Args:
        q: ``(B, H, N, D)`` queries. ``k``: ``(B, Hkv, M, D)``, ``v``: ``(B, Hkv, M, Dv)`` with H a
            multiple of Hkv (GQA/MQA). For ``lorentz_dot``/``distance`` these are the *space*
            coordinates of points on H_k (time x0 = sqrt(k + |xs|²) is implied); with
            ``full_lorentz=True`` they are full ``(..., D+1)`` Lorentz points, checked to lie on H_k.
            For ``poincare_distance`` they are points of geoopt ``PoincareBall(c=1/k)``; for
            ``euclidean`` plain vectors. dtype float64/float32/float16/bfloat16 (the math runs in
            float32 or better; the output has the input dtype unless ``out_dtype`` says otherwise).
        score: ``"lorentz_dot"`` s = (2/τ)<q,k>_L (HyboNet/Hypformer); ``"distance"`` s = −β·d(q,k)
            (or −β·d² with ``squared=True``), d = sqrt(k)·arccosh(−<q,k>_L/k) with the argument clamped
            to ≥ 1 + ``acosh_eps``; ``"poincare_distance"`` s = −β·d_P(q,k); ``"euclidean"`` s = q·k/τ;
            ``"linear"``: Hypformer's focused linear attention (Yang et al. 2024, KDD), O(N) — weights
            w_ij = φ(q_i)·φ(k_j) on space coordinates, φ(x) = f_p(ReLU(x) + 1e-6), f_p(u) =
            |u|·u^p/|u^p|; the output's space part is Σ_j w_ij v_j / Σ_j w_ij (+ ``value_map(v)_i``) and
            its time is recomputed (no centroid). The ``blockwise`` backend runs it in O(N·D²) time
            and O(N·D) memory, causal included (see ``hyptorch_flash.ops.linear_attention``).
        output: ``"lorentz"`` (space coordinates of the Lorentz centroid; full ``(…, Dv+1)`` point
            with ``full_lorentz=True``), ``"klein"`` (Einstein midpoint, ball of radius sqrt(k)),
            ``"poincare"`` (gyromidpoint in ``PoincareBall(c=1/k)``); ``"euclidean"`` only for the
            euclidean score. Default: ``"poincare"`` for ``poincare_distance``, else ``"lorentz"``.
        curvature: k > 0 as a float, 0-d tensor, per-head ``(H,)`` tensor (learnable tensors get
            gradients), ``geoopt.Lorentz`` or ``geoopt.PoincareBall`` (k = 1/c).
        tau, scale: temperature of the dot-product scores (default τ = sqrt(D)); ``scale`` is the
            multiplier itself (s = scale·<q,k>). ``beta``: β of the distance scores (default 1).
            ``power``: the focusing power p > 0 of ``score="linear"`` (default 2, Hypformer's
            ``power_k``). Each may be a float, a 0-d or an ``(H,)`` tensor.
        value_map: ``score="linear"`` only, self-attention (N = M): Hypformer's value-mapping term, a
            callable (e.g. ``nn.Linear(Dv, Dv)``) taking ``v`` ``(B, Hkv, M, Dv)`` to the same shape;
            query i's output space part gets ``value_map(v)_i`` added before its time is recomputed.
        causal: query i attends to keys j ≤ i (top-left aligned, as SDPA's ``is_causal``).
        attn_mask: bool (True = may attend) or float (added to the scores), broadcastable to
            ``(B, H, N, M)`` — the ``F.scaled_dot_product_attention`` convention.
        key_padding_mask: bool ``(B, M)``, True = padded key (ignored).
        return_lse: also return the log-sum-exp of the masked scores, ``(B, H, N)`` in float32
            (float64 for float64 inputs); −inf for rows that see no key. For ``linear`` it is
            log Σ_j w_ij (the scores are s_ij = log w_ij).
        backend: ``"reference" | "blockwise" | "cuda" | "auto"``; ``None`` uses the
            :func:`attention_backend` context, then ``$HYPTORCH_FLASH_BACKEND``, then ``"auto"``.
        check_inputs: validate values (NaN/Inf, curvature sign, points on the manifold / in the
            ball). Costs a device sync; shapes, dtypes and devices are always checked.
        out_dtype: the output's dtype (default: the inputs'). A wider one keeps what the math computed
            instead of rounding it to the inputs' dtype, e.g. ``torch.float32`` for bf16 inputs whose
            output feeds a float32 residual stream: the PyTorch backends return their float32 result;
            ``cuda`` returns its float32 result refined to 15 (bf16) / 18 (fp16) significant bits (the
            kernel then also feeds P to P·V in two terms, as under autograd: about +45 % kernel time).
            The kernels compute in float32, so ``float64`` adds no precision there.

    Rows whose keys are all masked return the origin (zero space part; for ``linear``, plus the
    value-map term) with zero gradient.

    Example::

        >>> q, k, v = (torch.randn(2, 4, 16, 8) for _ in range(3))
        >>> out = hyperbolic_attention(q, k, v, score="distance", causal=True, backend="blockwise")
        >>> out.shape
        torch.Size([2, 4, 16, 8])
    """
    problem = build_problem(
        q, k, v, score=score, output=output, curvature=curvature, tau=tau, scale=scale, beta=beta,
        squared=squared, causal=causal, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
        full_lorentz=full_lorentz, check_inputs=check_inputs, acosh_eps=acosh_eps, return_lse=return_lse,
        power=power, value_map=value_map, out_dtype=out_dtype,
    )
    out, lse = backends.select_backend(problem, backend).run(problem)
    return (out, lse) if return_lse else out


def hyperbolic_attention_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    score: str = "lorentz_dot",
    curvature=1.0,
    tau=None,
    scale=None,
    beta=None,
    squared: bool = False,
    causal: bool = False,
    attn_mask: Optional[torch.Tensor] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    check_inputs: bool = True,
    acosh_eps: Optional[float] = None,
    power=None,
) -> torch.Tensor:
    """The attention weights P ``(B, H, N, M)`` of :func:`hyperbolic_attention` (same arguments).

    Always materialised by the reference math (O(N·M) memory), for inspection and ``need_weights``.
    Rows that see no key are all zero. For ``score="linear"``: Hypformer's normalised kernel weights.
    """
    problem = build_problem(
        q, k, k[..., :1], score=score, output=None, curvature=curvature, tau=tau, scale=scale, beta=beta,
        squared=squared, causal=causal, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
        full_lorentz=False, check_inputs=check_inputs, acosh_eps=acosh_eps, power=power,
    )
    return attention_probabilities(problem)[0].to(q.dtype)
