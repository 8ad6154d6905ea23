"""The blockwise backend: FlashAttention-2 (Dao 2023, Algorithms 1 and 2) in pure PyTorch.

The forward walks query tiles Q_i and key/value tiles K_j, V_j with an online softmax and keeps
only O and the log-sum-exp L; the backward recomputes each score tile S_ij from Q_i, K_j and L.
Activation memory is O(N·D + block²) instead of O(N·M). Works on any device and dtype, for every
variant: the score tile comes from the variant's functor (``scores.py``), and its gradients with
respect to q, k, curvature and the score coefficient come from autograd on that one tile.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .linear_attention import linear_attention
from .masks import MaskSpec
from .problem import AttentionProblem

BLOCK_Q = 256  # tile sizes: large enough that per-tile Python overhead is small, O(block²) memory
BLOCK_K = 256
NEG_INF = float("-inf")


def _masked_scores(score_fn, score_kwargs, mask: MaskSpec, q_i, k_j, curv, coef, i0, j0):
    """S_ij (raw, differentiable) and S_ij with the mask applied (−inf where masked)."""
    s_raw = score_fn(q_i, k_j, curv, coef, **score_kwargs)
    bias = mask.tile_bias(i0, i0 + q_i.shape[2], j0, j0 + k_j.shape[2], s_raw.dtype, s_raw.device)
    return s_raw, (s_raw if bias is None else s_raw + bias)


class BlockwiseAttention(torch.autograd.Function):
    """O, L = FlashAttention(Q, K, V) with a pluggable score functor.

    Inputs: ``q (B,H,N,D)``, ``k (B,H,M,D)``, ``v (B,H,M,Dv)``, ``curv`` and ``coef`` (0-d or
    ``(1,H,1,1)``), all in one floating dtype. Returns ``O (B,H,N,Dv)`` (softmax-weighted values,
    0 for fully masked rows) and ``L (B,H,N)`` (log-sum-exp of the scores, −inf for such rows).
    """

    @staticmethod
    def forward(ctx, q, k, v, curv, coef, score_fn, score_kwargs, mask: MaskSpec, block_q, block_k):
        B, H, N, _ = q.shape
        M = k.shape[2]
        out = q.new_zeros(B, H, N, v.shape[-1])
        lse = q.new_full((B, H, N), NEG_INF)
        for i0 in range(0, N, block_q):
            q_i = q[:, :, i0 : i0 + block_q]
            n = q_i.shape[2]
            m_i = q.new_full((B, H, n, 1), NEG_INF)  # running row max
            l_i = q.new_zeros(B, H, n, 1)  # running softmax denominator
            o_i = q.new_zeros(B, H, n, v.shape[-1])  # running unnormalised output
            for j0 in range(0, M, block_k):
                if mask.tile_fully_masked(i0, i0 + n, j0, min(j0 + block_k, M)):
                    continue
                _, s_ij = _masked_scores(score_fn, score_kwargs, mask, q_i, k[:, :, j0 : j0 + block_k], curv, coef, i0, j0)
                m_new = torch.maximum(m_i, s_ij.amax(dim=-1, keepdim=True))
                m_safe = m_new.masked_fill(m_new == NEG_INF, 0.0)  # rows with nothing visible yet
                p_ij = torch.exp(s_ij - m_safe)  # P~_ij = exp(S_ij − m_i^(j))
                alpha = torch.exp(m_i - m_safe)  # rescale of the old state, exp(m^(j−1) − m^(j))
                l_i = alpha * l_i + p_ij.sum(dim=-1, keepdim=True)
                o_i = alpha * o_i + p_ij @ v[:, :, j0 : j0 + block_k]
                m_i = m_new
            visible = l_i > 0
            out[:, :, i0 : i0 + n] = torch.where(visible, o_i / torch.where(visible, l_i, 1.0), 0.0)
            lse[:, :, i0 : i0 + n] = torch.where(visible, m_i + torch.log(torch.where(visible, l_i, 1.0)), NEG_INF).squeeze(-1)
        ctx.save_for_backward(q, k, v, curv, coef, out, lse)
        ctx.score_fn, ctx.score_kwargs, ctx.mask = score_fn, score_kwargs, mask
        ctx.block_q, ctx.block_k = block_q, block_k
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, d_lse):
        q, k, v, curv, coef, out, lse = ctx.saved_tensors
        need_q, need_k, need_v, need_curv, need_coef = ctx.needs_input_grad[:5]
        N, M = q.shape[2], k.shape[2]
        d_out = d_out.contiguous()
        d_lse = torch.zeros_like(lse) if d_lse is None else d_lse
        lse_safe = lse.masked_fill(lse == NEG_INF, 0.0).unsqueeze(-1)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        d_curv, d_coef = torch.zeros_like(curv), torch.zeros_like(coef)

        def key_tiles(n, i0):
            for j0 in range(0, M, ctx.block_k):
                if not ctx.mask.tile_fully_masked(i0, i0 + n, j0, min(j0 + ctx.block_k, M)):
                    yield j0, slice(j0, j0 + ctx.block_k)

        def probabilities_and_dp(q_i, k_j, c, a, i0, j0, sl_i, sl_j):
            s_raw, s_ij = _masked_scores(ctx.score_fn, ctx.score_kwargs, ctx.mask, q_i, k_j, c, a, i0, j0)
            p_ij = torch.exp(s_ij.detach() - lse_safe[:, :, sl_i])  # P_ij recomputed from L_i
            dp_ij = d_out[:, :, sl_i] @ v[:, :, sl_j].transpose(-1, -2)  # dP_ij = dO_i V_jᵀ
            return s_raw, p_ij, dp_ij

        for i0 in range(0, N, ctx.block_q):
            sl_i = slice(i0, i0 + ctx.block_q)
            n = q[:, :, sl_i].shape[2]
            # D_i = rowsum(P_i ∘ dP_i), equal to FA2's rowsum(dO_i ∘ O_i) in exact arithmetic. Summing the
            # very dP values used below keeps Σ_j dS_ij ≈ 0 to rounding: the centroid epilogue makes dO nearly
            # orthogonal to O with large entries, and rowsum(dO ∘ O) loses that cancellation (50× worse dq in fp32).
            delta = torch.zeros_like(lse_safe[:, :, sl_i])
            for j0, sl_j in key_tiles(n, i0):
                _, p_ij, dp_ij = probabilities_and_dp(q[:, :, sl_i], k[:, :, sl_j], curv, coef, i0, j0, sl_i, sl_j)
                delta += (p_ij * dp_ij).sum(dim=-1, keepdim=True)
            for j0, sl_j in key_tiles(n, i0):
                leaves = [
                    t.detach().requires_grad_(need)
                    for t, need in ((q[:, :, sl_i], need_q), (k[:, :, sl_j], need_k), (curv, need_curv), (coef, need_coef))
                ]
                with torch.enable_grad():
                    s_raw, p_ij, dp_ij = probabilities_and_dp(*leaves, i0, j0, sl_i, sl_j)
                if need_v:
                    dv[:, :, sl_j] += p_ij.transpose(-1, -2) @ d_out[:, :, sl_i]  # dV_j += P_ijᵀ dO_i
                ds_ij = p_ij * (dp_ij - delta + d_lse[:, :, sl_i].unsqueeze(-1))  # dS_ij = P_ij ∘ (dP_ij − D_i) (+ dL_i)
                wanted = [t for t in leaves if t.requires_grad]
                if not wanted:
                    continue
                grads = iter(torch.autograd.grad(s_raw, wanted, ds_ij, allow_unused=True))
                for t, acc in zip(leaves, (dq[:, :, sl_i], dk[:, :, sl_j], d_curv, d_coef)):
                    if t.requires_grad:
                        g = next(grads)
                        if g is not None:
                            acc += g
        return (
            dq if need_q else None, dk if need_k else None, dv if need_v else None,
            d_curv if need_curv else None, d_coef if need_coef else None,
            None, None, None, None, None,
        )


def blockwise_attention(problem: AttentionProblem, *, block_q: int = BLOCK_Q, block_k: int = BLOCK_K):
    """Output (in the problem's output model and input dtype) and LSE, with O(N) activation memory.

    ``score="linear"`` runs its own O(N)-time form instead (``linear_attention.py``).
    """
    if problem.variant.aggregation == "space":
        return linear_attention(problem)
    q, k, v, curv, coef = problem.expanded()
    o, lse = BlockwiseAttention.apply(
        q, k, v, curv, coef, problem.variant.score, problem.score_kwargs(), problem.mask, block_q, block_k
    )
    return problem.finish(o), lse
