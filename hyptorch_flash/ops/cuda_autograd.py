"""Autograd of ``hyptorch_flash::attention_fwd``: the fused backward op ``hyptorch_flash::attention_bwd``.

Registered with ``torch.library.register_autograd`` (so eager autograd and ``torch.compile`` both see
it); the forward (run with ``refine_output=True``: bf16/fp16 backwards need the refinement codes, and
raise without them) saves q, k, v, out, its refinement codes, lse and o0 — O(N·D) — and the backward
recomputes P from lse.
``torch.use_deterministic_algorithms(True)`` selects the backward's atomic-free mode.

Imported by :mod:`.cuda_backend`, which then lets the ``cuda`` backend run inputs that require grad.
Gradients reaching the op's ``lse`` or ``o0`` outputs are not implemented: the backward raises
``NotImplementedError`` instead of dropping them (the ``cuda`` backend already declines
``return_lse=True`` with grad, so ``auto`` uses blockwise there).
"""
from __future__ import annotations

import torch

from . import cuda_backend
from . import cuda_backward  # noqa: F401 - registers hyptorch_flash::attention_bwd


def _setup_context(ctx, inputs, output):
    q, k, v, curvature, coef, key_padding_mask, score, out_id, causal, squared, acosh_eps, refine_output = inputs
    out, lse, o0, out_refine = output
    ctx.save_for_backward(q, k, v, out, out_refine, lse, o0, curvature, coef)
    ctx.key_padding_mask = key_padding_mask
    ctx.flags = (score, out_id, causal, squared, acosh_eps)
    ctx.set_materialize_grads(False)  # unused outputs give None, so a real lse/o0 gradient is detectable


def _backward(ctx, dout, _dlse, _do0, _drefine):
    q, k, v, out, out_refine, lse, o0, curvature, coef = ctx.saved_tensors
    score, out_id, causal, squared, acosh_eps = ctx.flags
    if _dlse is not None or _do0 is not None:
        raise NotImplementedError(
            "hyptorch_flash cuda backend: gradients through the log-sum-exp or o0 outputs of "
            "hyptorch_flash::attention_fwd are not implemented; use backend='blockwise' to differentiate the LSE"
        )
    if q.dtype not in cuda_backend.BACKWARD_DTYPES:
        raise NotImplementedError(
            f"hyptorch_flash cuda backend: the fused backward runs {cuda_backend.BACKWARD_DTYPES}, not {q.dtype}; "
            "use backend='blockwise'"
        )
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, dcurv, dcoef = torch.ops.hyptorch_flash.attention_bwd(
        dout.contiguous(), q, k, v, out, out_refine, lse, o0, curvature, coef, ctx.key_padding_mask, score, out_id,
        causal, squared, acosh_eps, torch.are_deterministic_algorithms_enabled(),
    )
    return dq, dk, dv, dcurv, dcoef, None, None, None, None, None, None, None


torch.library.register_autograd("hyptorch_flash::attention_fwd", _backward, setup_context=_setup_context)
cuda_backend.BACKWARD_REGISTERED = True
