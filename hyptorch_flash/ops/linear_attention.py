r"""Hyperbolic linear attention (Hypformer) in O(N): ``hyperbolic_attention(score="linear")``.

What is computed (per batch, head and query i; q, k, v are *space* coordinates of Lorentz points
of H_k, the time coordinates never enter the weights):

    φ(x)   = f_p(ReLU(x) + ε),  f_p(u) = (|u| / |u^p|)·u^p,  ε = 1e-6,  p = ``power`` (default 2)
    w_ij   = φ(q_i)·φ(k_j)  for the visible keys j (causal: j ≤ i; key padding removes j)
    y_i    = Σ_j w_ij v_j / Σ_j w_ij  (+ value_map(v)_i)  — the output's space part
    output = (sqrt(k + |y_i|²), y_i), in the chosen chart (``focused_linear.space_epilogue``).

Relation to Hypformer's code (``TransConvLayer.linear_focus_attention`` of Yang et al. 2024, KDD,
github.com/marlin-codes/hypformer; read for the facts, not copied):

- Same feature map: ReLU(x) + 1e-6, then ``fp(x, p) = (‖x‖/‖x^p‖)·x^p`` with p = ``power_k``
  (default 2.0). We evaluate f_p on u/max(u) (scale-invariant inside the power), so large p or
  |x| ~ 1e3 cannot overflow; the value is the same.
- Hypformer also divides both feature maps by a learnable ``|norm_scale| + 1e-6``. f_p is
  1-homogeneous (f_p(a·u) = a·f_p(u)), so that factor multiplies numerator and denominator alike and
  cancels; we drop it (it only rescales Hypformer's denominator epsilon below).
- Hypformer computes ``numerator / (denominator + 1e-6)``. That epsilon makes the output depend on
  the scale of the features (outputs shrink towards 0 when |φ|²·N ~ 1e-6); we divide exactly and
  guard only a normaliser that is exactly 0 (all keys masked, or underflow), giving 0 there.
- Value-mapping term: Hypformer adds ``v_map_mlp(v)`` (an ``nn.Linear`` on the value space coordinates,
  shared by the heads) to each query's output before recomputing the time coordinate; pass it as
  ``value_map``. It needs N = M (the query's own token). ``HyperbolicMultiheadAttention`` owns one.
- Heads: Hypformer then averages the heads' space parts (``mean(dim=1)`` on its ``[N, H, D]`` layout)
  or concatenates them through a linear map; this op returns per-head outputs ``(B, H, N, D)`` like
  every score, and the layer merges heads as it does for the softmax scores. HyperCore's port
  (``LorentzMultiheadAttention.linear_focus_attention``) applies the same ``mean(dim=1)`` to a
  ``[B, N, H, D]`` tensor, which averages over *tokens* instead of heads (and ignores its mask).
- New here: masks (causal, key padding), GQA, per-head curvature and power, other output charts,
  and the causal form (Hypformer's code has none) — a chunked prefix sum with a custom backward.

Algorithms (``focused_linear``), with ṽ_j = [v_j | 1] so numerator and normaliser share one pass:
non-causal, two einsums, O(N·D·Dv) time: Σ_j φ(k_j) ṽ_jᵀ, then φ(q_i)ᵀ(·); causal, chunks of C
rows: intra-chunk tril(Φq Φkᵀ) ṽ (O(N·C·Dv)) plus the running state S = Σ_{j<chunk} φ(k_j) ṽ_jᵀ
(O(N·D·Dv)); the backward is three scans of the same kind and keeps only Φq, Φk, ṽ (O(N·D)).
Padded keys get φ = 0. The recurrent form for decoding (:class:`LinearAttentionState`) keeps S only.

Backends: ``blockwise`` runs the forms above (and ``auto`` picks it: ``cuda`` has no kernel for this
score and declines). ``reference`` materialises the N×M weights through the score functor
s_ij = log w_ij and a softmax (softmax_j log w_ij = w_ij / Σ_j w_ij), so it also takes a dense
``attn_mask``: bool removes weights, float multiplies them by exp(mask); ``blockwise`` declines one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .focused_linear import CHUNK, CausalLinearScan, chunked_scan, focus_features, space_average
from .problem import AttentionProblem, build_problem


def _features_and_values(problem: AttentionProblem):
    """φ(q) ``(B,H,N,D)``, φ(k) with padded keys zeroed, and ṽ = [v | 1] ``(B,H,M,Dv+1)`` (compute dtype)."""
    q, k, v, _, power = problem.expanded()
    # φ is cheap elementwise math with ~8 (N, D) intermediates: recompute it in the backward instead of storing them
    phi_q, phi_k = (checkpoint(focus_features, x, power, use_reentrant=False) for x in (q, k))
    pad = problem.mask.key_padding_mask
    if pad is not None:
        phi_k = phi_k.masked_fill(pad[:, None, :, None], 0.0)
    return phi_q, phi_k, torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


def _lse(normaliser: torch.Tensor) -> torch.Tensor:
    # scores are s_ij = log w_ij, so LSE = log Σ_j w_ij; −inf where no key is seen
    return torch.log(normaliser.squeeze(-1))


def linear_attention(problem: AttentionProblem, *, chunk: int = CHUNK):
    """Backend entry point for ``score="linear"``: ``(output, lse)`` in O(N·D) memory.

    Non-causal: two einsums. Causal (top-left aligned like SDPA: query i sees keys j ≤ i): the
    chunked scan with its custom backward; keys beyond the last query are never visible and are cut,
    missing keys (M < N) are padded with φ = 0. A dense ``attn_mask`` is not supported here (the
    backend registry declines it; the reference backend applies it).
    """
    phi_q, phi_k, v_aug = _features_and_values(problem)
    N, M = phi_q.shape[2], phi_k.shape[2]
    if problem.mask.causal:
        if M > N:
            phi_k, v_aug = phi_k[:, :, :N], v_aug[:, :, :N]
        elif M < N:
            phi_k, v_aug = F.pad(phi_k, (0, 0, 0, N - M)), F.pad(v_aug, (0, 0, 0, N - M))
        nd = CausalLinearScan.apply(phi_q, phi_k, v_aug, chunk)
    else:
        kv = torch.einsum("bhmd,bhme->bhde", phi_k, v_aug)  # Σ_j φ(k_j) ṽ_jᵀ
        nd = torch.einsum("bhnd,bhde->bhne", phi_q, kv)
    o, normaliser = space_average(nd)
    return problem.finish(o), _lse(normaliser)


@dataclass
class LinearAttentionState:
    """Recurrent state of causal linear attention for decoding: the prefix sums, no keys or values.

    ``kv`` ``(B, H, D, Dv+1)`` = Σ_j φ(k_j)·[v_j | 1]ᵀ over the ``length`` tokens seen so far
    (Σ φ(k) v and Σ φ(k) side by side, H = query heads: φ(k) depends on the head's power); compute
    dtype. A step costs O(D·Dv) per token, whatever the length.
    """

    kv: Optional[torch.Tensor] = None
    length: int = 0

    def reset(self) -> None:
        self.kv, self.length = None, 0


def linear_attention_with_state(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: LinearAttentionState,
    *,
    causal: bool = True,
    curvature=1.0,
    power=None,
    value_map: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    key_padding_mask: Optional[torch.Tensor] = None,
    output: Optional[str] = None,
    full_lorentz: bool = False,
    check_inputs: bool = True,
    chunk: int = CHUNK,
) -> torch.Tensor:
    """``hyperbolic_attention(score="linear")`` for new tokens that continue a sequence; updates ``state``.

    ``q`` ``(B, H, n, D)``, ``k`` ``(B, Hkv, n, D)``, ``v`` ``(B, Hkv, n, Dv)``: the n new tokens
    (space coordinates; arguments as :func:`hyperbolic_attention`, ``key_padding_mask`` ``(B, n)``
    covers the new tokens only). Every new query sees all earlier tokens (through ``state``) and, with
    ``causal=True``, the new keys j ≤ i (else all new keys). Feeding a sequence in pieces (one token at
    a time, or chunks) gives the same outputs as one causal call on the whole sequence.
    Differentiable, but meant for inference: run it under ``torch.no_grad()`` when decoding.
    """
    problem = build_problem(
        q, k, v, score="linear", output=output, curvature=curvature, tau=None, scale=None, beta=None,
        squared=False, causal=causal, attn_mask=None, key_padding_mask=key_padding_mask,
        full_lorentz=full_lorentz, check_inputs=check_inputs, acosh_eps=None, power=power, value_map=value_map,
    )
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"hyptorch_flash.linear_attention_with_state: q and k must hold the same new tokens, "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}")
    phi_q, phi_k, v_aug = _features_and_values(problem)
    prior = state.kv
    expected = phi_q.shape[:2] + (phi_q.shape[3], v_aug.shape[3])
    if prior is not None and prior.shape != expected:
        raise ValueError(f"hyptorch_flash.linear_attention_with_state: state of shape {tuple(prior.shape)} does not "
                         f"continue queries {tuple(phi_q.shape)} with values of dim {v_aug.shape[3] - 1}")
    prior = None if prior is None else prior.to(phi_q.dtype)
    if causal:
        nd, kv = chunked_scan(phi_q, phi_k, v_aug, chunk=chunk, state=prior)
    else:
        kv = torch.einsum("bhmd,bhme->bhde", phi_k, v_aug) + (0 if prior is None else prior)
        nd = torch.einsum("bhnd,bhde->bhne", phi_q, kv)
    state.kv, state.length = kv, state.length + q.shape[2]
    return problem.finish(space_average(nd)[0])
