"""A few lorentz_dot fwd+bwd steps on the cuda backend (bf16, B=2, H=16, N=4096), for ncu / nsys:

    ncu -k regex:attention_bwd_kv --launch-skip 1 --launch-count 1 --section SpeedOfLight python3 dev/one_fwd_bwd.py 64
"""
import sys

import torch

import hyptorch_flash as hf

D = int(sys.argv[1]) if len(sys.argv) > 1 else 64
score = sys.argv[2] if len(sys.argv) > 2 else "lorentz_dot"
gen = torch.Generator(device="cuda").manual_seed(0)
q, k, v = (torch.randn(2, 16, 4096, D, device="cuda", generator=gen).mul_(0.25).bfloat16().requires_grad_()
           for _ in range(3))
dout = torch.randn(2, 16, 4096, D, device="cuda", generator=gen).bfloat16()
for _ in range(3):
    out = hf.hyperbolic_attention(q, k, v, score=score, backend="cuda")
    torch.autograd.grad(out, (q, k, v), dout)
torch.cuda.synchronize()
