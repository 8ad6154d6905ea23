"""A/B of forward tile settings in one process (GPU): the forward extension built once per setting of the
tuning macros (attention_fwd_kernel.cuh, e.g. -DHYPTORCH_FWD_ROW_TILES_D64=1), timed on the same inputs,
interleaved (CUDA events, best of 3 medians of 7 × 10 calls), with the largest output difference to the
first setting as a sanity check.

    python dev/ab_fwd_tiles.py "" "-DHYPTORCH_FWD_ROW_TILES_D64=1 -DHYPTORCH_FWD_ROW_TILES_D128=1"

``--build-only SETTING...`` builds (or finds cached) the extensions and exits, so several settings can be
built while something else uses the GPU; each setting's build name is a hash of its flags. PyTorch SDPA on
the same inputs is timed once per head dimension, as the yardstick for ratios.
"""

import torch.nn.functional as F

from ab_common import build_settings, forward_problems, timed  # dev/ab_common.py
from hyptorch_flash.ops import cuda_build


def build(setting: str):
    """The forward extension built with extra nvcc flags ``setting``: the build the tests get with
    HYPTORCH_FLASH_NVCC_EXTRA=setting (same name and cache key); the default ("") is the package's own."""
    if not setting:
        return cuda_build.load()
    return cuda_build.build_extension(cuda_build.extra_nvcc_flags(setting, cuda_build.BACKWARD_MACROS))


def main():
    settings, build_only = build_settings()
    mods = [build(s) for s in settings]
    if build_only:
        return
    for D, name, flops, problem in forward_problems():
        if name == "lorentz_dot":
            q, k, v = problem[:3]
            t = min(timed(lambda: F.scaled_dot_product_attention(q, k, v)) for _ in range(3))
            print(f"D={D} sdpa        {t:.3f} ms {flops / t / 1e9:.1f}", flush=True)
        for refine in (False, True):
            args = (*problem, refine)
            outs = [m.fwd(*args)[0].float() for m in mods]
            diff = max((o - outs[0]).abs().max().item() for o in outs)
            ms = [[] for _ in mods]
            for _ in range(3):
                for i, m in enumerate(mods):
                    ms[i].append(timed(lambda: m.fwd(*args)))
            line = "  ".join(f"[{i}] {min(t):.3f} ms {flops / min(t) / 1e9:.1f}" for i, t in enumerate(ms))
            print(f"D={D} {name:11s} refine={int(refine)} {line}  maxdiff {diff:.1e}", flush=True)
    for i, s in enumerate(settings):
        print(f"[{i}] {s or '(default)'}")


if __name__ == "__main__":
    main()
