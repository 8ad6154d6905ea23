"""A/B of forward tile settings in one process (GPU): the forward extension built once per setting of the
tuning macros (attention_fwd_kernel.cuh, e.g. -DHYPTORCH_FWD_ROW_TILES_D64=1), timed on the same inputs,
interleaved (CUDA events, best of 3 medians of 7 × 10 calls), with the largest output difference to the
first setting as a sanity check.

    python dev/ab_fwd_tiles.py "" "-DHYPTORCH_FWD_ROW_TILES_D64=1 -DHYPTORCH_FWD_ROW_TILES_D128=1"
"""
import sys

from ab_common import forward_problems, timed  # dev/ab_common.py
from hyptorch_flash.ops import cuda_build


def main():
    settings = sys.argv[1:] or [""]
    sources = cuda_build.extension_sources()
    hashed = sorted(p for p in cuda_build.CSRC.iterdir() if p.suffix in (".cpp", ".cu", ".cuh", ".h"))
    # the default setting is the package's own (cached) build
    mods = [cuda_build.load() if not s else
            cuda_build.jit_build(f"hyptorch_flash_ab_tiles_{i}", sources, hashed, cuda_build.NVCC_FLAGS + s.split())
            for i, s in enumerate(settings)]
    for D, name, flops, problem in forward_problems():
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
