"""The fused backward of the ``cuda`` backend: custom op ``hyptorch_flash::attention_bwd``.

FlashAttention-2's backward (Dao 2023, Algorithm 2) for every score variant, in three steps:

1. ``csrc/hyperbolic_attention/bwd_prepare.cu`` (one warp per query row; :func:`prepare_backward` is the
   same math in PyTorch, its CPU reference): pull the upstream gradient back through the centroid
   epilogue's per-row Jacobian at the forward's output y, dO_L = Jᵀ·dout (closed forms in
   :func:`epilogue_pullback`), and D_i = rowsum(dO_L ∘ O_L), which is 0 for the hyperbolic outputs (the
   epilogue is scale-invariant). The Jacobian needs y to ~16 bits: bf16/fp16 forwards run for the
   backward (``refine_output=True``) return int8 codes that refine the rounded output
   (:func:`.output_refinement.refined_output`) and feed P to P·V as hi + lo so that O is that accurate
   (one rounding of P leaves O off by ~2^-9 of a term, which the Jacobian amplifies at large norms);
   float32 has a float32 output. dO_s goes to the kernels as two terms in the input dtype (hi + lo ≈ 16 significant bits): at
   large norms dP_ij = dO_s·v_j + dO_0·v0_j and dv_s + (v_s/v0)·dv0 cancel by orders of magnitude, and
   one rounding of dO_s would not survive that. float32 inputs: q, k, v and dO_s go to the kernels as
   three bf16 parts each (:func:`split_bf16_parts`, the forward's split), every tensor-core product
   taking the six part products that matter, so the contractions keep float32 accuracy; step 1 runs in
   PyTorch.
2. Stage-1 kernels (``csrc/hyperbolic_attention/bwd_kernel.cuh``, extension ``hyptorch_flash_cuda_bwd``):
   recompute P from the saved log-sum-exp, form dX_ij = ∂L/∂X_ij for the variant's inner quantity X
   and return the O(N·D) contractions G, Gk, dV_s, the row/column sums R, RX, C, CX, dv0 and the
   per-head scalars Σ dS·u, Σ dX·X (``bwd_params.cuh``). dQ uses fp32 atomics, or, in deterministic mode,
   a query-parallel kernel without atomics. float32 inputs first run a delta pass (:class:`FusedKernels`).
3. ``csrc/hyperbolic_attention/bwd_finish.cu`` (one warp per row; :func:`finish_gradients` is the same
   math in PyTorch, its CPU reference, and still finishes poincare_distance), O(N·D): the chain rule
   through the recomputed time coordinates (dq_s = G − (q_s/q0)·R, dk_s, dv_s alike), the Poincaré lift
   factors, the curvature and the score coefficient; dK/dV are summed over the query heads of a GQA group.

The steps run over passes of (batch element, key head) slices (:func:`backward_in_passes`,
:func:`slice_plan`) so that the float32 scratch stays a small share of the memory training holds anyway.

:func:`contractions_reference` computes step 2 with dense PyTorch math, so steps 1 and 3 (and the
passes) are tested on the CPU against autograd of the reference backend.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import numerics
from . import cuda_build
from .output_refinement import REFINE_SHIFT

EXTENSION_NAME = "hyptorch_flash_cuda_bwd"
SCORE_EUCLIDEAN, SCORE_LORENTZ_DOT, SCORE_DISTANCE, SCORE_POINCARE = 0, 1, 2, 3
OUTPUT_EUCLIDEAN, OUTPUT_LORENTZ, OUTPUT_KLEIN, OUTPUT_POINCARE = 0, 1, 2, 3
NATIVE_HEAD_DIMS = (64, 128)
# c·|p|² ≤ 1 − margin, in the compute dtype (float32) like the forward kernel and the reference.
BALL_TOP = 1.0 - numerics.ball_margin(torch.float32)

_module = None


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for the kernels' dtypes; float64 for float64 (the CPU tests' dense model of the kernels)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def split_bf16_parts(x: torch.Tensor) -> torch.Tensor:
    """float32 ``x`` → ``(3, *x.shape)`` bfloat16 parts with x = hi + mid + lo exactly (each part the
    round-to-nearest-even bf16 of what the previous ones leave; the subtractions are exact), the split
    the forward kernel makes of its float32 inputs (``attention_fwd_split.cu``)."""
    if x.dtype != torch.float32:
        raise TypeError(f"hyptorch_flash: split_bf16_parts takes float32, got {x.dtype}")
    parts = torch.empty((3, *x.shape), dtype=torch.bfloat16, device=x.device)
    rest = x.clone()
    for i in range(3):
        parts[i].copy_(rest)
        if i < 2:
            rest.sub_(parts[i].float())
    return parts


def _squares(x: torch.Tensor) -> torch.Tensor:
    """|x|² over the last dim in the statistics dtype; float32 inputs sum in float64 like the forward's
    split path (the time coordinates sqrt(k + |x|²) enter cancelling differences at large norms)."""
    acc = torch.float64 if x.dtype in (torch.float32, torch.float64) else torch.float32
    return x.to(acc, copy=True).square_().sum(-1).to(_stats_dtype(x.dtype)).contiguous()


def sources():
    """The backward extension's binding and kernel files (one ninja job per file)."""
    csrc = cuda_build.CSRC
    return [csrc / "binding_bwd.cpp", *sorted(csrc.glob("bwd_*.cu"))]


def hashed_sources():
    """Every file the backward extension's build reads (its cache key)."""
    shared = ("attention_ids.h", "device_primitives.cuh", "hopper_primitives.cuh", "numerics.cuh", "wgmma_ops.cuh")
    return [p for p in sorted(cuda_build.CSRC.iterdir())
            if p.name.startswith(("bwd_", "binding_bwd")) or p.name in shared]


def build_extension(extra: list[str]):
    """The backward extension built with extra nvcc flags ``extra`` (JIT, ninja, cached under a file lock)."""
    return cuda_build.jit_build(cuda_build.build_name(EXTENSION_NAME, extra), sources(), hashed_sources(),
                                cuda_build.NVCC_FLAGS + extra)


def load_extension():
    """The backward extension (built on first use, with $HYPTORCH_FLASH_NVCC_EXTRA's backward switches)."""
    global _module
    if _module is None:
        _module = build_extension(cuda_build.environment_extra_flags(cuda_build.FORWARD_MACROS))
    return _module


# --------------------------------------------------------------------------------------------------
# Step 1: epilogue pull-back and D_i
# --------------------------------------------------------------------------------------------------

def epilogue_pullback(dout: torch.Tensor, out: torch.Tensor, o0: torch.Tensor, curvature: torch.Tensor, output: int):
    """dO_L = Jᵀ·dout for the centroid epilogue, and the space part O_s of the normalised average.

    ``dout``, ``out`` ``(B,H,N,D)``, ``o0`` ``(B,H,N)``, ``curvature`` ``(H,)``. Returns float32 (or
    float64) ``dO_s`` ``(B,H,N,D)``, ``dO_0`` ``(B,H,N)`` and ``O_s``. With y = out, g = dout, κ = k:

    - lorentz (y = √κ·O_s/n, n² = O0² − |O_s|², y0 = √(κ + |y|²)): O_s = o0·y/y0,
      dO_s = (y0/o0)(g + (g·y)·y/κ), dO_0 = −(g·y)·y0²/(κ·o0);
    - klein (y = √κ·O_s/O0): O_s = o0·y/√κ, dO_s = √κ·g/o0, dO_0 = −(g·y)/o0;
    - poincare (y = √κ·O_s/(O0 + n), a = |y|²/κ): O_s = 2·o0·y/(√κ(1 + a)),
      dO_s = ((1 + a)/o0)(√κ·g/2 + (g·y)·y/(√κ(1 − a))), dO_0 = −(g·y)(1 + a)/(o0(1 − a));
    - euclidean: the identity (dO_0 = 0).

    Rows that saw no key (o0 = 0) get dO_L = 0: their output is the constant origin.
    Also returns the epilogue's own curvature gradient ``(H,)``: every chart is √κ times a function of
    O, so ∂L/∂κ|_O = Σ_i (g·y)/(2κ).
    """
    dt = _stats_dtype(out.dtype)
    g, y = dout.to(dt), out.to(dt)
    if output == OUTPUT_EUCLIDEAN:
        return g, torch.zeros_like(g[..., 0]), y, torch.zeros_like(curvature, dtype=dt)
    kap = curvature.to(dt).view(1, -1, 1, 1)
    sk = kap.sqrt()
    valid = (o0 > 0).unsqueeze(-1)
    w = torch.where(valid, o0.to(dt).unsqueeze(-1), torch.ones((), dtype=dt, device=o0.device))
    gy = (g * y).sum(-1, keepdim=True)
    ysq = (y * y).sum(-1, keepdim=True)
    # (B,H,N,D) terms are built in place, one buffer each (peak memory of the backward); the
    # operations and their order are those of the formulas above
    if output == OUTPUT_LORENTZ:
        y0sq = kap + ysq
        y0 = y0sq.sqrt()
        o_s = (w * y).div_(y0)
        do_s = (gy * y).div_(kap).add_(g).mul_(y0 / w)
        do_0 = -gy * y0sq / (kap * w)
    elif output == OUTPUT_KLEIN:
        o_s = (w * y).div_(sk)
        do_s = (sk * g).div_(w)
        do_0 = -gy / w
    elif output == OUTPUT_POINCARE:
        a = (ysq / kap).clamp_max(1.0 - numerics.ball_margin(dt))
        o_s = (2.0 * w * y).div_(sk * (1.0 + a))
        do_s = (0.5 * sk * g).add_((gy * y).div_(sk * (1.0 - a))).mul_((1.0 + a) / w)
        do_0 = -gy * (1.0 + a) / (w * (1.0 - a))
    else:
        raise ValueError(f"hyptorch_flash: unknown output id {output}")
    zero = torch.zeros((), dtype=dt, device=g.device)
    dkap = (torch.where(valid, gy, zero) / (2 * kap)).sum((0, 2, 3))
    return do_s.masked_fill_(~valid, 0.0), torch.where(valid, do_0, zero).squeeze(-1), o_s, dkap


def prepare_backward(dout, y, o0, curvature, output: int, dtype: torch.dtype):
    """Kernel inputs of step 1 from the upstream gradient and the forward's output.

    ``y`` ``(B,H,N,D)``: the forward's output to ~16 bits or better (float32 output, or
    :func:`.output_refinement.refined_output`), ``o0`` ``(B,H,N)`` its O_0. Returns ``dout_hi``,
    ``dout_lo`` (``dtype``; ``dout_lo`` is None for the euclidean output, whose dO = dout is exact),
    ``dout0``, ``delta`` (``(B,H,N)``, float32; float64 when ``dtype`` is float64) and the epilogue's
    curvature gradient ``(H,)``.
    float32: ``dout_hi`` is dO_s as three bf16 parts ``(3,B,H,N,D)`` (:func:`split_bf16_parts`) and
    ``dout_lo`` is None. D_i = rowsum(dO_L ∘ O_L): for the hyperbolic outputs dO_L·O_L = 0 exactly (the
    epilogue is scale-invariant), so only the residue of splitting dO_s into hi + lo (or parts) is left.
    """
    stats = _stats_dtype(dtype)
    do_s, do_0, o_rebuilt, dkap = epilogue_pullback(dout.to(stats), y.to(stats), o0.to(stats), curvature, output)
    split = dtype == torch.float32
    dout_hi = split_bf16_parts(do_s) if split else do_s.to(dtype)
    if output == OUTPUT_EUCLIDEAN:
        return dout_hi, None, do_0.to(stats), (do_s * o_rebuilt).sum(-1), dkap
    if split:
        dout_lo = None
        residue = dout_hi[0].to(stats).add_(dout_hi[1].to(stats)).add_(dout_hi[2].to(stats)).sub_(do_s)
    else:
        dout_lo = (do_s - dout_hi.to(stats)).to(dtype)
        residue = dout_hi.to(stats, copy=True).add_(dout_lo.to(stats)).sub_(do_s)  # (hi + lo) − dO_s, one buffer
    del do_s
    delta = residue.mul_(o_rebuilt).sum(-1)
    return dout_hi, dout_lo, do_0.to(stats), delta, dkap


# --------------------------------------------------------------------------------------------------
# Step 2 in dense PyTorch (the kernels' contract, for CPU tests)
# --------------------------------------------------------------------------------------------------

def _key_lift(k_sq, v_sq, kap, score):
    """(w_j, v0_j, λ_j) per key: w = k0 (dot/distance) or b_j (poincare), value lift (v0, λ)."""
    if score == SCORE_POINCARE:
        w = 1.0 / (1.0 - (k_sq / kap).clamp_max(BALL_TOP))
        av = (v_sq / kap).clamp_max(BALL_TOP)
        inv = 1.0 / (1.0 - av)
        return w, kap.sqrt() * (1.0 + av) * inv, 2.0 * inv
    if score == SCORE_EUCLIDEAN:
        zero = torch.zeros_like(k_sq)
        return zero, zero, torch.ones_like(k_sq)
    return (kap + k_sq).sqrt(), (kap + v_sq).sqrt(), torch.ones_like(k_sq)


def _query_weight(q_sq, kap, score):
    if score == SCORE_POINCARE:
        return 1.0 / (1.0 - (q_sq / kap).clamp_max(BALL_TOP))
    if score == SCORE_EUCLIDEAN:
        return torch.zeros_like(q_sq)
    return (kap + q_sq).sqrt()


def contractions_reference(q, k, v, dout_hi, dout_lo, lse, delta, dout0, curvature, coef, key_padding_mask,
                           score: int, causal: bool, squared: bool, acosh_eps: float, *, dtype=torch.float64,
                           rounding=None):
    """What the stage-1 kernels compute, with dense (B,H,N,M) PyTorch math in ``dtype``.

    ``rounding`` (e.g. ``torch.bfloat16``) rounds dX and P where the kernel feeds them to the tensor
    cores. Returns ``(G, row, Gk, dVs, col, scalars)`` like the extension's ``bwd`` (scalars ``(B,H,1,2)``).
    """
    B, H, N, D = q.shape
    group = H // k.shape[1]
    rnd = (lambda x: x.to(rounding).to(dtype)) if rounding is not None else (lambda x: x)
    qf = q.to(dtype)
    kf, vf = (x.to(dtype).repeat_interleave(group, dim=1) for x in (k, v))
    kap = curvature.to(dtype).view(1, H, 1, 1)
    cf = coef.to(dtype).view(1, H, 1, 1)
    q_sq, k_sq, v_sq = ((x * x).sum(-1, keepdim=True) for x in (qf, kf, vf))
    qw = _query_weight(q_sq, kap, score)  # (B,H,N,1)
    kw, v0, lam = (x.transpose(-1, -2) for x in _key_lift(k_sq, v_sq, kap, score))  # (B,H,1,M)
    dot = qf @ kf.transpose(-1, -2)
    if score == SCORE_POINCARE:
        x_raw = q_sq + k_sq.transpose(-1, -2) - 2.0 * dot
        X = x_raw.clamp_min(0.0)
        dz_dx = 2.0 * qw * kw / kap
        z = 1.0 + dz_dx * X
    else:
        x_raw = None
        X = dot - qw * kw
        z, dz_dx = -X / kap, -1.0 / kap
    if score in (SCORE_EUCLIDEAN, SCORE_LORENTZ_DOT):
        u, ds_dx = X, cf.expand_as(X)
    else:
        zc = z.clamp_min(1.0 + acosh_eps)
        a = torch.acosh(zc)
        inv_root = 1.0 / ((zc - 1.0) * (zc + 1.0)).sqrt()
        u = -kap * a * a if squared else -kap.sqrt() * a
        ds_dz = -2.0 * cf * kap * a * inv_root if squared else -cf * kap.sqrt() * inv_root
        ok = z >= 1.0 + acosh_eps
        if x_raw is not None:
            ok = ok & (x_raw >= 0)
        ds_dx = torch.where(ok, ds_dz * dz_dx, torch.zeros_like(z))
    valid = torch.ones(B, 1, N, k.shape[2], dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        valid = valid & ~key_padding_mask[:, None, None, :]
    if causal:
        valid = valid & torch.ones(N, k.shape[2], dtype=torch.bool, device=q.device).tril()
    lse_f = lse.to(dtype).unsqueeze(-1)
    lse_f = torch.where(lse_f == float("-inf"), torch.full_like(lse_f, float("inf")), lse_f)
    P = torch.where(valid, torch.exp(cf * u - lse_f), torch.zeros((), dtype=dtype, device=q.device))
    d0 = dout0.to(dtype).unsqueeze(-1)
    dout_s = dout_hi.to(dtype) if dout_lo is None else dout_hi.to(dtype) + dout_lo.to(dtype)
    dP = lam * (dout_s @ vf.transpose(-1, -2)) + d0 * v0
    dS = P * (dP - delta.to(dtype).unsqueeze(-1))
    dx_exact = dS * ds_dx
    dX = rnd(dx_exact)
    rnd_p = rnd if dout_lo is None else (lambda x: x)  # with dout_lo, the kernel also splits P in two terms
    zero = torch.zeros((), dtype=dtype, device=q.device)
    r_w = kw if score != SCORE_POINCARE else torch.ones_like(kw)
    c_w = qw if score != SCORE_POINCARE else torch.ones_like(qw)
    dXX = dX * X
    row = torch.stack([(dX * r_w).sum(-1), dXX.sum(-1)], -1)
    # dv0 from the same rounded P as dV_s: dv_s + (v_s/v0)·dv0 cancel at large norms
    col = torch.stack([(dX * c_w).sum(-2), dXX.sum(-2), (rnd_p(P) * d0).sum(-2)], -1)
    s1 = torch.where(valid, dS * u, zero).sum((-1, -2))
    if score == SCORE_DISTANCE:
        s2 = torch.where(valid, dXX, zero).sum((-1, -2))
    elif score == SCORE_POINCARE:
        # ∂L/∂c at fixed p, q: Σ dX·X·(1/c + |p|²a + |q|²b), a/b terms where unclamped, unrounded dX
        alpha = torch.where(q_sq / kap <= BALL_TOP, q_sq * qw, zero)
        beta = torch.where(k_sq / kap <= BALL_TOP, k_sq * kw.transpose(-1, -2), zero).transpose(-1, -2)
        s2 = torch.where(valid, dx_exact * X * (kap + alpha + beta), zero).sum((-1, -2))
    else:
        s2 = torch.zeros_like(s1)
    scalars = torch.stack([s1, s2], -1).unsqueeze(2)
    G = dX @ kf
    Gk = dX.transpose(-1, -2) @ qf
    dVs = rnd_p(P).transpose(-1, -2) @ dout_s
    return G, row, Gk, dVs, col, scalars


# --------------------------------------------------------------------------------------------------
# Step 3: chain rule through time coordinates, lifts, curvature and coefficient
# --------------------------------------------------------------------------------------------------

def _per_head_scalars(scalars: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(s1, s2) ``(H,)`` = Σ dS·u, Σ dX·X from the kernels' per-(batch, head, key block) partials, in a fixed order."""
    return scalars.to(dtype).sum((0, 2)).unbind(-1)


def _distance_dcurvature(s1, s2, coef, curvature, squared: bool) -> torch.Tensor:
    """The distance score's own share of dκ ``(H,)``: (e·coef·s1 − s2)/κ, e = 1 squared, ½ not."""
    return ((1.0 if squared else 0.5) * coef * s1 - s2) / curvature


def finish_gradients(G, row, Gk, dVs, col, scalars, q, k, v, curvature, coef, score: int, squared: bool,
                     dcurvature_epilogue=None, squares=None):
    """Gradients ``(dq, dk, dv, dcurvature, dcoef)`` from the kernels' contractions (shapes in bwd_params.cuh).

    dq/dk/dv come back in the dtype of q/k/v, dcurvature/dcoef in that of curvature/coef.
    With R, C the time-weighted sums and s1 = Σ dS·u, s2 = Σ dX·X (u = s/coef):

    - dot/distance: dq = G − q·R/q0, dk = Gk − k·C/k0, dv = dV_s + v·dv0/v0,
      dκ = Σ (−R/(2q0) − C/(2k0) + dv0/(2v0)) [+ (e·coef·s1 − s2)/κ for distance, e = 1 squared, ½ not];
    - poincare (X = |p − q|², a_i = 1/(1 − c|p_i|²), c = 1/κ): dq = q·(2R + 2c·a·RX) − 2G (likewise k with b),
      dv through the value lift x = (√κ(1 + a_v), 2v)/(1 − a_v), dκ = −c²·s2 + e·coef·s1/κ + (value lift),
      where the kernel's s2 = ∂L/∂c at fixed p, q = Σ dX·X·(1/c + |p|²a + |q|²b);
    - dcoef = s1 for every score; ``dcurvature_epilogue`` (from :func:`prepare_backward`) is added to dκ.

    ``squares``: optional (|q|², |k|², |v|²) of shapes (B,H,N), (B,Hkv,M), (B,Hkv,M) in G's dtype, when the
    caller already has them (the kernels' inputs).
    """
    dt = G.dtype
    B, H, N, D = G.shape
    # G, Gk and dVs are overwritten (they are the kernels' scratch). q, k, v enter the products in their
    # own dtype (PyTorch upcasts per element, the same values as a float32 copy) and k, v are never
    # repeated over a GQA group: the key-side terms are summed over the group first, so no (B, H, M, D)
    # float32 copy of an input is made (peak memory of the backward).
    Hkv = k.shape[1]
    group = H // Hkv

    def group_sum(x):  # (B, H, M, …) → (B, Hkv, M, …): dK/dV of a key head sum over its query heads
        return x if group == 1 else x.view(B, Hkv, group, *x.shape[2:]).sum(2)

    kap = curvature.to(dt).view(1, H, 1, 1)
    cf = coef.to(dt).view(1, H)
    R, RX = row[..., :1], row[..., 1:]
    C, CX, dv0 = col[..., :1], col[..., 1:2], col[..., 2:]
    s1, s2 = _per_head_scalars(scalars, dt)
    heads_sum = lambda x: x.sum((0, 2, 3))  # noqa: E731 - (B,H,n,1) → (H,)
    if squares is None:
        squares = tuple(x.to(dt).square().sum(-1) for x in (q, k, v))
    q_sq = squares[0].to(dt).unsqueeze(-1)
    k_sq, v_sq = (x.to(dt).repeat_interleave(group, dim=1).unsqueeze(-1) for x in squares[1:])
    e = 1.0 if squared else 0.5
    if score == SCORE_EUCLIDEAN:
        dq, dk, dv = G, Gk, dVs
        dkap = torch.zeros(H, dtype=dt, device=G.device)
    elif score in (SCORE_LORENTZ_DOT, SCORE_DISTANCE):
        q0, k0, v0 = ((kap + x).sqrt() for x in (q_sq, k_sq, v_sq))
        # in place: G, Gk, dVs are this call's own buffers (saves three float32 (B,H,N,D) temporaries)
        dq = G.addcmul_(q, R / q0, value=-1.0)
        dk = group_sum(Gk).addcmul_(k, group_sum(C / k0), value=-1.0)
        dv = group_sum(dVs).addcmul_(v, group_sum(dv0 / v0))
        dkap = heads_sum(-R / (2 * q0)) + heads_sum(-C / (2 * k0) + dv0 / (2 * v0))
        if score == SCORE_DISTANCE:
            dkap = dkap + _distance_dcurvature(s1, s2, cf[0], kap.view(H), squared)
    elif score == SCORE_POINCARE:
        c = 1.0 / kap
        qa_raw, kb_raw = c * q_sq, c * k_sq
        a = 1.0 / (1.0 - qa_raw.clamp_max(BALL_TOP))
        b = 1.0 / (1.0 - kb_raw.clamp_max(BALL_TOP))
        zero = torch.zeros((), dtype=dt, device=G.device)
        rx_a = torch.where(qa_raw <= BALL_TOP, RX * a, zero)  # d(a_i)·∂a/∂(c|p|²)/c-free part
        cx_b = torch.where(kb_raw <= BALL_TOP, CX * b, zero)
        dq = G.mul_(-2.0).addcmul_(q, 2 * R + 2 * c * rx_a)
        dk = group_sum(Gk.mul_(-2.0)).addcmul_(k, group_sum(2 * C + 2 * c * cx_b))
        av_raw = v_sq / kap
        av = av_raw.clamp_max(BALL_TOP)
        inv = 1.0 / (1.0 - av)
        sk = kap.sqrt()
        v_dot_dvs = (dVs.view(B, Hkv, group, *dVs.shape[2:]) * v.unsqueeze(2)).sum(-1).view(B, H, -1, 1)
        common = torch.where(av_raw <= BALL_TOP, 2 * inv * inv * (v_dot_dvs + sk * dv0), zero)
        dv = group_sum(dVs.mul_(2 * inv)).addcmul_(v, group_sum((2 / kap) * common))
        dkap_v = heads_sum(dv0 * (1 + av) * inv / (2 * sk) - (av / kap) * common)
        # s2 = ∂L/∂c at fixed p, q (the kernel's unrounded sum; = s2/c + Σ RX·|q|²a + Σ CX·|k|²b with rounded dX)
        dkap = -(c.view(H) ** 2) * s2 + e * cf[0] * s1 / kap.view(H) + dkap_v
    else:
        raise ValueError(f"hyptorch_flash: unknown score id {score}")
    if dcurvature_epilogue is not None:
        dkap = dkap + dcurvature_epilogue.to(dt)
    if score == SCORE_EUCLIDEAN:
        dk, dv = group_sum(dk), group_sum(dv)
    return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dkap.to(curvature.dtype).contiguous(),
            s1.to(coef.dtype).contiguous())


# --------------------------------------------------------------------------------------------------
# The custom op
# --------------------------------------------------------------------------------------------------

def _padded_head_dim(*dims: int) -> int:
    for d in NATIVE_HEAD_DIMS:
        if d >= max(dims):
            return d
    raise NotImplementedError(f"hyptorch_flash: the CUDA backward supports head dims up to {NATIVE_HEAD_DIMS[-1]}, got {dims}")


def _pad_to(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` zero-padded to last dim ``dim``, contiguous, its data 16-byte aligned (the kernels' vector loads; a
    contiguous view can start anywhere in its storage, and then it is copied)."""
    x = (x if x.shape[-1] == dim else F.pad(x, (0, dim - x.shape[-1]))).contiguous()
    return x if x.data_ptr() % 16 == 0 else x.clone()


# The backward runs over passes of (batch element, key head) slices so that its scratch stays a small
# share of what training holds anyway (q, k, v, out and their gradients): at most
# max(SCRATCH_FLOOR_BYTES, SCRATCH_FRACTION × those bytes). Scratch per slice is estimated as
# SCRATCH_BUFFERS_PER_HEAD float32 (max(N, M), D) buffers per query head, an upper estimate (dO as hi + lo,
# the four float32 contractions, PyTorch temporaries of step 3; about 3.3 measured at N = 16384 in one pass,
# with a float32 O that the backward no longer makes).
# Each pass also carries at least MIN_PASS_WORK of N·M·D (summed over its query heads): every pass costs
# the host tens of PyTorch launches, which short passes cannot hide (H100, B=2, H=16, N=4096, D=64,
# with the pull-back still in PyTorch: 4 passes took 9.4 ms against 7.6 ms for one).
# E.g. B=2, H=16, D=64: one pass up to N = 4096, 4 at N = 8192, 16 at N = 16384.
SCRATCH_FRACTION = 0.1
SCRATCH_FLOOR_BYTES = 64 * 2**20
SCRATCH_BUFFERS_PER_HEAD = 8
# float32 inputs also hold q, k, v and dO_s as bf16 parts (1.5 float32 buffers each) and run step 1 in PyTorch.
SPLIT_EXTRA_BUFFERS = 4
MIN_PASS_WORK = 2**35


def slice_plan(batch: int, kv_heads: int, slices_per_pass: int) -> list[tuple[int, int, int, int]]:
    """Passes ``(b0, b1, h0, h1)`` (batch range × key-head range) covering every slice exactly once.

    A pass holds whole GQA groups (a key head with all its query heads), so dK/dV are complete in it;
    it spans several batch elements only with all their heads (the slices stay contiguous views).
    """
    per_pass = max(1, slices_per_pass)
    if per_pass >= batch * kv_heads:
        return [(0, batch, 0, kv_heads)]
    if per_pass >= kv_heads:
        step = per_pass // kv_heads
        return [(b, min(b + step, batch), 0, kv_heads) for b in range(0, batch, step)]
    width = -(-kv_heads // -(-kv_heads // per_pass))  # balanced passes within one batch element
    return [(b, b + 1, h, min(h + width, kv_heads)) for b in range(batch) for h in range(0, kv_heads, width)]


class FusedKernels:
    """The extension's stages behind the interface :func:`backward_in_passes` calls: ``operands`` (what
    the kernels read of q, k, v: float32 as three bf16 parts), ``prepare`` (step 1, ``bwd_prepare.cu``
    for bf16/fp16, :func:`prepare_backward` for float32), ``bwd`` (stage 1) and ``finish`` (step 3,
    ``bwd_finish.cu``; :func:`finish_gradients` for poincare_distance), and ``squares`` (|x|² per row,
    ``bwd_squares.cu``).

    Split float32 inputs and the poincare_distance score: ``bwd`` first runs the delta pass (extension
    ``delta``), which recomputes D_i = Σ_j P_ij dP_ij from the very P and dP of stage 1, and uses it
    instead of step 1's D_i. Step 1's value rests on dO_L·O_L = 0, exact for the exact O but not for the
    forward's float32 O; the residue, times the lifted values, was the float32 gradients' largest error
    (dq of rows that see few keys) and the fp16 dcoef gap of Poincaré values near the boundary, whose
    lifts are large. The pass costs about one more query-parallel sweep; the other scores in bf16/fp16
    skip it.
    """

    def __init__(self, ext):
        self._bwd = ext.bwd
        self._delta = ext.delta
        self._prepare = ext.prepare
        self._finish = ext.finish
        self.squares = ext.squares  # |x|² per row, as _squares

    def bwd(self, q, k, v, dout_hi, dout_lo, lse, delta, dout0, *common_and_deterministic):
        common = common_and_deterministic[:-1]  # (q_sq, k_sq, v_sq, curvature, coef, padding, score, …)
        if q.dim() == 5 or common[6] == SCORE_POINCARE:  # split float32 inputs, or the poincare score
            delta = self._delta(q, k, v, dout_hi, dout_lo, lse, dout0, *common)
        return self._bwd(q, k, v, dout_hi, dout_lo, lse, delta, dout0, *common_and_deterministic)

    @staticmethod
    def operands(x: torch.Tensor) -> torch.Tensor:
        return split_bf16_parts(x) if x.dtype == torch.float32 else x

    def prepare(self, dout, out, out_refine, o0, curvature, output: int, dtype: torch.dtype):
        if dtype == torch.float32:
            return prepare_backward(dout, out, o0, curvature, output, dtype)
        dout_hi, dout_lo, dout0, delta, dkap_rows = self._prepare(dout, out, out_refine, o0, curvature, output)
        return dout_hi, None if output == OUTPUT_EUCLIDEAN else dout_lo, dout0, delta, dkap_rows.sum((0, 2))

    def finish(self, G, row, Gk, dVs, col, scalars, q, k, v, curvature, coef, score: int, squared: bool,
               dcurvature_epilogue=None, squares=None):
        """:func:`finish_gradients` (same arguments and results; ``squares`` required) with the O(N·D) part in
        ``bwd_finish.cu`` for the euclidean, lorentz_dot and distance scores; poincare_distance runs
        :func:`finish_gradients` itself."""
        if score == SCORE_POINCARE:
            return finish_gradients(G, row, Gk, dVs, col, scalars, q, k, v, curvature, coef, score, squared,
                                    dcurvature_epilogue, squares)
        dq, dk, dv, dkap_q, dkap_k = self._finish(G, row, Gk, dVs, col, q, k, v, *squares, curvature, score)
        s1, s2 = _per_head_scalars(scalars, dkap_q.dtype)
        dkap = dkap_q.sum((0, 2)) + dkap_k.sum((0, 2))
        if score == SCORE_DISTANCE:
            dkap = dkap + _distance_dcurvature(s1, s2, coef, curvature, squared)
        if dcurvature_epilogue is not None:
            dkap = dkap + dcurvature_epilogue
        return dq, dk, dv, dkap.to(curvature.dtype).contiguous(), s1.to(coef.dtype).contiguous()


def _check_forward_outputs(q, out, out_refine, o0):
    B, H, N, _ = q.shape
    if out.shape[:3] != (B, H, N) or o0.shape != (B, H, N) or out.dtype != q.dtype:
        raise ValueError(f"hyptorch_flash: the forward's out {tuple(out.shape)} {out.dtype} and o0 {tuple(o0.shape)} "
                         f"do not match q {tuple(q.shape)} {q.dtype}")
    if q.dtype in REFINE_SHIFT and out_refine.shape != out.shape:
        raise RuntimeError(
            "hyptorch_flash: the fused backward of bf16/fp16 inputs needs the forward's refinement codes "
            f"(out_refine of shape {tuple(out.shape)}, got {tuple(out_refine.shape)}): run "
            "hyptorch_flash::attention_fwd with refine_output=True")


def _backward_pass(kernels, dout, q, k, v, out, out_refine, lse, o0, curvature, coef, key_padding_mask, score, output,
                   causal, squared, acosh_eps, deterministic):
    """Steps 1-3 on one pass; ``kernels`` has ``operands``, ``prepare`` and ``bwd`` (:class:`FusedKernels`).

    Returns (dq, dk, dv) in the inputs' dtype and (dcurvature, dcoef) ``(H,)`` in the statistics dtype
    (float32; float64 for float64 inputs, the CPU tests' dense stand-in for the kernels).
    """
    stats = _stats_dtype(q.dtype)
    dim = _padded_head_dim(q.shape[-1], v.shape[-1])
    qp, kp, vp = (_pad_to(x, dim) for x in (q, k, v))
    curv, cf = curvature.to(stats).contiguous(), coef.to(stats).contiguous()
    common = (kernels.squares(qp), kernels.squares(kp), kernels.squares(vp), curv, cf, key_padding_mask, score, causal,
              squared, float(acosh_eps))
    lse = lse.contiguous()
    q_in, k_in, v_in = (kernels.operands(x) for x in (qp, kp, vp))
    refine = _pad_to(out_refine, dim) if out_refine.numel() else out_refine
    dout_hi, dout_lo, dout0, delta, dcurv_epilogue = kernels.prepare(_pad_to(dout, dim), _pad_to(out, dim), refine,
                                                                     o0.contiguous(), curv, output, q.dtype)
    acc = kernels.bwd(q_in, k_in, v_in, dout_hi.contiguous(), None if dout_lo is None else dout_lo.contiguous(), lse,
                      delta.contiguous(), dout0.contiguous(), *common, deterministic)
    del dout_hi, dout_lo, q_in, k_in, v_in
    dq, dk, dv, dcurv, dcoef = kernels.finish(*acc, qp, kp, vp, curv, cf, score, squared, dcurv_epilogue,
                                              squares=common[:3])
    return dq[..., : q.shape[-1]], dk[..., : k.shape[-1]], dv[..., : v.shape[-1]], dcurv, dcoef


def backward_in_passes(kernels, dout, q, k, v, out, out_refine, lse, o0, curvature, coef, key_padding_mask,
                       score: int, output: int, causal: bool, squared: bool, acosh_eps: float, deterministic: bool,
                       scratch_bytes: Optional[int] = None):
    """The op's gradients, computed over the passes of :func:`slice_plan` (module notes above).

    ``out``, ``out_refine``, ``lse``, ``o0``: the forward's outputs (``out_refine`` empty for float32).
    ``scratch_bytes``: an explicit scratch budget (tests, benchmarks), taken as is (no MIN_PASS_WORK).
    Passes run one after the other in a fixed order, so the deterministic mode stays bit-identical.
    """
    _check_forward_outputs(q, out, out_refine, o0)
    B, H, N, _ = q.shape
    Hkv, M = k.shape[1], k.shape[2]
    group = H // Hkv
    dim = _padded_head_dim(q.shape[-1], v.shape[-1])
    buffers = SCRATCH_BUFFERS_PER_HEAD + (SPLIT_EXTRA_BUFFERS if q.dtype == torch.float32 else 0)
    per_slice = buffers * group * max(N, M) * dim * 4
    if scratch_bytes is None:
        held = 2 * sum(x.numel() * x.element_size() for x in (q, k, v)) + dout.numel() * dout.element_size()
        slices = max(SCRATCH_FLOOR_BYTES, int(SCRATCH_FRACTION * held)) // per_slice
        slices = max(slices, -(-MIN_PASS_WORK // (group * N * M * dim)))
    else:
        slices = scratch_bytes // per_slice
    plan = slice_plan(B, Hkv, slices)
    flags = (score, output, causal, squared, acosh_eps, deterministic)
    if len(plan) == 1:
        dq, dk, dv, dcurv, dcoef = _backward_pass(kernels, dout, q, k, v, out, out_refine, lse, o0, curvature, coef,
                                                  key_padding_mask, *flags)
        return dq.contiguous(), dk.contiguous(), dv.contiguous(), dcurv.to(curvature.dtype), dcoef.to(coef.dtype)
    dq, dk, dv = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))
    dcurv = torch.zeros(H, dtype=_stats_dtype(q.dtype), device=q.device)
    dcoef = torch.zeros_like(dcurv)
    for b0, b1, h0, h1 in plan:
        b, hk, hq = slice(b0, b1), slice(h0, h1), slice(h0 * group, h1 * group)
        pad = None if key_padding_mask is None else key_padding_mask[b]
        refine = out_refine[b, hq] if out_refine.numel() else out_refine
        g = _backward_pass(kernels, dout[b, hq], q[b, hq], k[b, hk], v[b, hk], out[b, hq], refine, lse[b, hq],
                           o0[b, hq], curvature[hq], coef[hq], pad, *flags)
        dq[b, hq], dk[b, hk], dv[b, hk] = g[:3]
        dcurv[hq] += g[3]
        dcoef[hq] += g[4]
    return dq, dk, dv, dcurv.to(curvature.dtype), dcoef.to(coef.dtype)


@torch.library.custom_op("hyptorch_flash::attention_bwd", mutates_args=(), device_types="cuda")
def attention_bwd(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    out_refine: torch.Tensor, lse: torch.Tensor, o0: torch.Tensor, curvature: torch.Tensor, coef: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor], score: int, output: int, causal: bool, squared: bool, acosh_eps: float,
    deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``hyptorch_flash::attention_fwd`` w.r.t. ``(q, k, v, curvature, coef)``.

    ``dout`` ``(B,H,N,Dv)``: gradient of ``out``; the other arguments are the forward's inputs and
    outputs, from a forward run with ``refine_output=True`` (bf16/fp16 need its ``out_refine``).
    ``deterministic=True`` computes dQ without atomics (bit-identical across runs).
    """
    return backward_in_passes(FusedKernels(load_extension()), dout, q, k, v, out, out_refine, lse, o0, curvature, coef,
                              key_padding_mask, score, output, causal, squared, acosh_eps, deterministic)


@attention_bwd.register_fake
def _attention_bwd_fake(dout, q, k, v, out, out_refine, lse, o0, curvature, coef, key_padding_mask, score, output,
                        causal, squared, acosh_eps, deterministic):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(curvature),
            torch.empty_like(coef))
