"""Host (CPU) time per call of the cuda backend at a tiny problem, where the GPU work is negligible, against
SDPA; then a cProfile table of the calls (GPU).

    python dev/host_overhead.py
"""
import cProfile
import pstats
import time

import torch
import torch.nn.functional as F

import hyptorch_flash as hf


def host_us(fn, calls=500):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls * 1e6
    torch.cuda.synchronize()
    return host


def main():
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 2, 128, 64, device="cuda", generator=gen).mul_(0.5).bfloat16() for _ in range(3))
    curvature, scale = torch.tensor(1.0, device="cuda"), torch.tensor(0.25, device="cuda")
    cuda = lambda: hf.hyperbolic_attention(q, k, v, backend="cuda", check_inputs=False, curvature=curvature,  # noqa: E731
                                           scale=scale)
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
    print(f"host µs per call: cuda backend {host_us(cuda):.1f}, SDPA {host_us(sdpa):.1f}")
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(300):
        cuda()
    profiler.disable()
    torch.cuda.synchronize()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
