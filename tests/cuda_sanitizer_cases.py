"""One small case of every CUDA forward and backward variant, for ``compute-sanitizer --tool memcheck``.

Run (on a GPU machine)::

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \\
        python tests/cuda_sanitizer_cases.py [dtype ...]

(dtypes among bfloat16 float16 float32, all three by default; no caching allocator, so an out-of-bounds
access hits unallocated memory instead of a cached block).
Shapes are not multiples of the tiles, with causal, key padding and GQA, so every boundary path runs
(first, forward only, with several key tiles per query tile); every case also runs the fused backward,
in one (batch, key head) slice per pass (the passes' views start inside the tensors); float32 runs the
split-precision kernels.
"""
import sys

import torch

import hyptorch_flash as hf
from hyptorch_flash.ops import cuda_backward
from attention_cases import SCORES, coefficient_kw, outputs_for, random_points


def forward_many_tiles(dtypes):
    """Forward only, several key tiles per query tile (the buffer rotation of the pipelined kernels)."""
    gen = torch.Generator().manual_seed(1)
    B, H, N, M = 1, 2, 200, 333
    for D in (64, 128):
        for dtype in dtypes:
            for score in SCORES:
                q = random_points((B, H, N, D), score, generator=gen).to(dtype).cuda()
                k = random_points((B, H, M, D), score, generator=gen).to(dtype).cuda()
                v = random_points((B, H, M, D), score, generator=gen).to(dtype).cuda()
                pad = (torch.rand(B, M, generator=gen) < 0.3).cuda()
                for causal, mask in ((False, None), (True, pad)):
                    out = hf.hyperbolic_attention(q, k, v, score=score, output=outputs_for(score)[0], causal=causal,
                                                  key_padding_mask=mask, backend="cuda", **coefficient_kw(score, 1.3))
                    torch.cuda.synchronize()
                    assert torch.isfinite(out).all(), (D, dtype, score, causal)
                print(f"ok many tiles D={D} {dtype} {score}")


def main(dtypes):
    forward_many_tiles(dtypes)
    gen = torch.Generator().manual_seed(0)
    B, H, Hkv, N, M = 2, 4, 2, 70, 45
    curvature = torch.linspace(0.5, 2.0, H, dtype=torch.float64)
    cuda_backward.SCRATCH_FLOOR_BYTES, cuda_backward.MIN_PASS_WORK = 0, 0  # one slice per pass
    for D in (64, 128, 40):
        for dtype in dtypes:
            for score in SCORES:
                for output in outputs_for(score):
                    q = random_points((B, H, N, D), score, generator=gen, curvature=curvature).to(dtype).cuda()
                    k = random_points((B, Hkv, M, D), score, generator=gen, curvature=curvature).to(dtype).cuda()
                    v = random_points((B, Hkv, M, D), score, generator=gen, curvature=curvature).to(dtype).cuda()
                    pad = (torch.rand(B, M, generator=gen) < 0.3).cuda()
                    q, k, v = (x.requires_grad_() for x in (q, k, v))
                    # (1.0, k = 1): the reciprocal path of the distance scores (β·sqrt(k) = 1)
                    # the second call also runs the deterministic backward (the query-parallel dQ kernel)
                    for coef, curv, deterministic in ((1.3, curvature, False),
                                                      (1.0, torch.ones(H, dtype=torch.float64), True)):
                        out = hf.hyperbolic_attention(q, k, v, score=score, output=output, causal=True,
                                                      key_padding_mask=pad, backend="cuda",
                                                      curvature=curv.cuda(), **coefficient_kw(score, coef))
                        torch.use_deterministic_algorithms(deterministic, warn_only=True)
                        out.backward(torch.randn_like(out))
                        torch.use_deterministic_algorithms(False)
                        torch.cuda.synchronize()
                        assert torch.isfinite(out).all(), (D, dtype, score, output)
                        assert all(torch.isfinite(x.grad).all() for x in (q, k, v))
                    print(f"ok D={D} {dtype} {score}/{output}")


if __name__ == "__main__":
    main([getattr(torch, name) for name in (sys.argv[1:] or ("bfloat16", "float16", "float32"))])
