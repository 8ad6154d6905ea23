"""A/B of the backward's switchable nvcc macros (bwd_kernel.cuh: HYPTORCH_BWD_WGMMA, HYPTORCH_BWD_EARLY_SCORES,
HYPTORCH_BWD_WGMMA_D128, HYPTORCH_BWD_D64_ARCCOSH_BLOCK_M and HYPTORCH_BWD_D128_DOT_BLOCK_M, on by default; the
opt-in ones, HYPTORCH_BWD_SPLIT_STEP and the others there) in one process (GPU): the backward extension built once
per setting, the library's fwd+bwd (``hyperbolic_attention(..., backend="cuda")`` under autograd) timed with each in turn on the same inputs,
interleaved (CUDA events, best of 3 medians of 7 × 3 steps), with each setting's largest gradient difference to
the first setting relative to the gradient's scale as a sanity check (the tests are the real check), and SDPA's
fwd+bwd on the same shapes as the yardstick.

    python dev/ab_bwd_opt_in.py "" "-DHYPTORCH_BWD_WGMMA=0" "-DHYPTORCH_BWD_D128_DOT_BLOCK_M=16"

``--build-only SETTING...`` builds (or finds cached) the extensions and exits (run it while the GPU is busy).
"""

import torch
import torch.nn.functional as F

import hyptorch_flash as hf
from ab_common import build_settings, timed  # dev/ab_common.py
from hyptorch_flash.ops import cuda_backward, cuda_build


def build(setting: str):
    """The backward extension with extra nvcc flags ``setting``: the build the tests get with
    HYPTORCH_FLASH_NVCC_EXTRA=setting (same name and cache key)."""
    return cuda_backward.build_extension(cuda_build.extra_nvcc_flags(setting, cuda_build.FORWARD_MACROS))


def fwd_bwd(q, k, v, dout, score):
    out = hf.hyperbolic_attention(q, k, v, score=score, backend="cuda", check_inputs=False)
    return torch.autograd.grad(out, (q, k, v), dout)


def main():
    settings, build_only = build_settings()
    mods = [build(s) for s in settings]
    if build_only:
        return
    B, H, N = 2, 16, 4096
    gen = torch.Generator(device="cuda").manual_seed(0)
    for D in (64, 128):
        q, k, v = (torch.randn(B, H, N, D, device="cuda", generator=gen).mul_(0.25).bfloat16().requires_grad_()
                   for _ in range(3))
        flops = 3.5 * 4 * B * H * N * N * D
        sdpa = min(timed(lambda: torch.autograd.grad(F.scaled_dot_product_attention(q, k, v), (q, k, v),
                                                     torch.ones_like(q)), reps=7, inner=3) for _ in range(3))
        print(f"D={D} sdpa        {sdpa:.3f} ms {flops / sdpa / 1e9:.1f}", flush=True)
        for score in ("lorentz_dot", "distance"):
            dout = torch.randn(B, H, N, D, device="cuda", generator=gen).bfloat16()
            grads = []
            for m in mods:
                cuda_backward._module = m
                grads.append([g.float() for g in fwd_bwd(q, k, v, dout, score)])
            # per setting: the largest gradient difference to the first setting, relative to the gradient's scale
            diffs = [max(((g - g0).abs().max() / g0.abs().max()).item() for g, g0 in zip(gs, grads[0])) for gs in grads]
            ms = [[] for _ in mods]
            for _ in range(3):
                for i, m in enumerate(mods):
                    cuda_backward._module = m
                    ms[i].append(timed(lambda: fwd_bwd(q, k, v, dout, score), reps=7, inner=3))
            line = "  ".join(f"[{i}] {min(t):.3f} ms {flops / min(t) / 1e9:.1f} (diff {d:.1e})"
                             for i, (t, d) in enumerate(zip(ms, diffs)))
            print(f"D={D} {score:11s} {line}", flush=True)
    cuda_backward._module = mods[0]
    for i, s in enumerate(settings):
        print(f"[{i}] {s or '(default)'}")


if __name__ == "__main__":
    main()
