"""Forward + backward speed and peak memory of the ``cuda`` backend against SDPA, in one run.

FLOPs follow flash-attn: fwd = 4·B·H·N²·D (D = space dim), fwd + bwd = 3.5 × fwd (halved if causal).
Each case: warm-up, then CUDA-event timing of ``iters`` fwd+bwd steps (random upstream gradient).
Peak memory: ``torch.cuda.max_memory_allocated`` over one fwd+bwd beyond the live inputs, against
the bytes of inputs + output + gradients + LSE. Prints one JSON row per case.
``flex_distance``: FlexAttention with the same distance ``score_mod`` and centroid as
``benchmarks/bench_attention.py``'s baseline (c), differentiated by autograd (compiled Flex backward).
A score suffixed ``:one_pass`` (e.g. ``lorentz_dot:one_pass``) runs the fused backward in one pass over
all (batch, head) slices instead of the scratch-bounded passes of ``cuda_backward.backward_in_passes``.

    python benchmarks/bench_cuda_backward.py --n 4096 --dims 64 128 --memory-n 16384
    python benchmarks/bench_cuda_backward.py --scores distance flex_distance
    python benchmarks/bench_cuda_backward.py --dtype float32 --batch 8 --heads 12 --n 1024 --dims 64 --causal
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import hyptorch_flash as hf
from hyptorch_flash.ops import cuda_backward

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_attention  # noqa: E402 - the forward benchmark's baselines (same score_mod, same centroid)


def _inputs(B, H, N, D, dtype, score):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=dtype, generator=gen) * 0.25 for _ in range(3))
    if score == "poincare_distance":
        q, k, v = (x / (1 + x.float().norm(dim=-1, keepdim=True)).to(dtype) for x in (q, k, v))
    return [x.requires_grad_() for x in (q, k, v)]


@contextlib.contextmanager
def _backward_passes(score):
    """``score:one_pass`` → (score, the backward in one pass); otherwise the library's default passes."""
    base, _, mode = score.partition(":")
    floor = cuda_backward.SCRATCH_FLOOR_BYTES
    if mode == "one_pass":
        cuda_backward.SCRATCH_FLOOR_BYTES = 1 << 62
    elif mode:
        raise ValueError(f"unknown score suffix {mode!r}")
    try:
        yield base
    finally:
        cuda_backward.SCRATCH_FLOOR_BYTES = floor


def _step_fn(score, q, k, v, causal):
    if score == "sdpa":
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if score == "flex_distance":
        one = torch.tensor(1.0, device=q.device)
        x = bench_attention.Inputs(q, k, v, causal, one, one, one)
        return lambda: bench_attention.flex_distance(x)
    return lambda: hf.hyperbolic_attention(q, k, v, score=score, causal=causal, backend="cuda", check_inputs=False)


def time_fwd_bwd(fn, grad, params, iters):
    for _ in range(3):
        torch.autograd.grad(fn(), params, grad)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        torch.autograd.grad(fn(), params, grad)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def run_case(score, B, H, N, D, dtype, causal, iters):
    row = {"score": score, "B": B, "H": H, "N": N, "D": D, "dtype": str(dtype), "causal": causal}
    try:
        with _backward_passes(score) as base:
            q, k, v = _inputs(B, H, N, D, dtype, base)
            fn = _step_fn(base, q, k, v, causal)
            grad = torch.randn_like(fn())
            ms = time_fwd_bwd(fn, grad, (q, k, v), iters)
    except Exception as exc:  # noqa: BLE001 - a baseline that cannot run is reported, not fatal
        return dict(row, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    flops = 3.5 * 4 * B * H * N * N * D / (2 if causal else 1)
    return dict(row, fwd_bwd_ms=round(ms, 3), tflops=round(flops / ms / 1e9, 1))


def peak_memory(score, B, H, N, D, dtype):
    with _backward_passes(score) as base:
        return _peak_memory(score, base, B, H, N, D, dtype)


def _peak_memory(score, base_score, B, H, N, D, dtype):
    q, k, v = _inputs(B, H, N, D, dtype, base_score)
    fn = _step_fn(base_score, q, k, v, False)
    out = fn()
    grad = torch.randn_like(out)
    del out
    torch.autograd.grad(fn(), (q, k, v), grad)  # warm-up (JIT, allocator)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    grads = torch.autograd.grad(fn(), (q, k, v), grad)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    elem = q.element_size()
    essential = (3 + 1 + 3) * B * H * N * D * elem + B * H * N * 4  # inputs, output, grads, LSE
    del grads
    return {"score": score, "N": N, "D": D, "peak_extra_mib": round(peak / 2**20, 1),
            "inputs_out_grads_lse_mib": round(essential / 2**20, 1),
            "ratio_total": round((peak + 3 * B * H * N * D * elem) / essential, 3)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--scores", nargs="+", default=["sdpa", "lorentz_dot", "euclidean", "distance"])
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--memory-n", type=int, default=0)
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                    help="dtype of the timed cases (float32: the split-precision kernels; SDPA in float32)")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of one lorentz_dot fwd+bwd")
    args = ap.parse_args()
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda}
    print(json.dumps(meta))
    for D in args.dims:
        for score in args.scores:
            row = run_case(score, args.batch, args.heads, args.n, D, getattr(torch, args.dtype), args.causal,
                           args.iters)
            print(json.dumps(row), flush=True)
    if args.profile:
        q, k, v = _inputs(args.batch, args.heads, args.n, args.dims[0], torch.bfloat16, "lorentz_dot")
        fn = _step_fn("lorentz_dot", q, k, v, args.causal)
        grad = torch.randn_like(fn())
        time_fwd_bwd(fn, grad, (q, k, v), 1)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            torch.autograd.grad(fn(), (q, k, v), grad)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
    if args.memory_n:
        for score in ("sdpa", "lorentz_dot", "lorentz_dot:one_pass", "distance"):
            print(json.dumps(peak_memory(score, args.batch, args.heads, args.memory_n, 64, torch.bfloat16)), flush=True)


if __name__ == "__main__":
    main()
