"""One bf16 forward call per head dim (B=2, H=16, N=4096, lorentz_dot) after a warm-up call: the program to
run under Nsight Compute, e.g.

    ncu --kernel-name regex:attention_fwd_kernel --launch-skip 1 --launch-count 1 --set full \
        python dev/profile_fwd_once.py 64
"""
import sys

import torch

from hyptorch_flash.ops import cuda_build

D = int(sys.argv[1]) if len(sys.argv) > 1 else 64
score = {"lorentz_dot": 1, "euclidean": 0, "distance": 2}[sys.argv[2] if len(sys.argv) > 2 else "lorentz_dot"]
mod = cuda_build.load()
gen = torch.Generator(device="cuda").manual_seed(0)
q, k, v = (torch.randn(2, 16, 4096, D, device="cuda", generator=gen).mul_(0.3).bfloat16() for _ in range(3))
curv, coef = torch.ones(16, device="cuda"), torch.full((16,), D**-0.5, device="cuda")
for _ in range(2):
    mod.fwd(q, k, v, curv, coef, None, score, 1, False, False, 1e-6, False)
torch.cuda.synchronize()
