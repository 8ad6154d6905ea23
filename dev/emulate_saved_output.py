"""CPU emulation: can the backward use the forward's own output instead of recomputing O (stage 0)?

For the CUDA gradient grid (bf16/fp16), the dense float64 model of the stage-1 kernels (dX rounded to the
dtype like the tensor-core operands) is fed the average O from one of these sources:
  stage0  O in float32 from exact P (what the removed stage-0 kernel computed, hi + lo P),
  fwd32   the forward kernel's O: P·λ rounded to the dtype for the PV product, then y in float32,
  fwd8    fwd32's y stored as dtype hi + an 8-bit refinement of the rounding residual,
  out     y rounded to the dtype (the forward's output alone);
  hilo…   the same with P·λ as hi + lo in the dtype (hilo = hilofwd32; hilofwd8 is what the library does).
Suffix +delta: D_i from the backward's own P and dP (the delta pass) for every score, +nodelta: for none
(default: poincare_distance only, the library's policy). --score NAME keeps one score.
Prints err / (2·err_ref + floor) per gradient (≤ 1 passes the CUDA test's bar), e.g.

    python dev/emulate_saved_output.py stage0 fwd32 hilo hilofwd8 hiloout
"""
import sys
import torch

sys.path.insert(0, "tests")
from hyptorch_flash.ops import cuda_backward as cb  # noqa: E402
from hyptorch_flash.ops.problem import build_problem  # noqa: E402
from hyptorch_flash.ops.reference import attention_probabilities  # noqa: E402
from test_cuda_backward import (CUDA_CASES, GRAD_FLOOR, OUTPUT_IDS, SCORE_IDS, DenseKernels, call,  # noqa: E402
                                forward_stats, grads_of, make_grad_case)
from hyptorch_flash import geometry  # noqa: E402


def refine8(y, hi, dtype):
    """y ≈ hi + q·2^(e−s), q an int8: s = 15 (bf16) / 18 (fp16), 2^e the power of two of |hi|."""
    s = 15 if dtype == torch.bfloat16 else 18
    h = hi.float()
    pow2 = (h.view(torch.int32) & 0x7F800000).view(torch.float32)
    q = torch.where(pow2 > 0, ((y.float() - h) / pow2 * 2.0**s).round().clamp(-127, 127), torch.zeros_like(h))
    return h.double() + q.double() * pow2.double() * 2.0**-s


def forward_o(q, k, v, curvature, coef, kw, dtype, source):
    coef_kw = {"scale": coef} if kw["score"] in ("lorentz_dot", "euclidean") else {"beta": coef}
    problem = build_problem(q, k, v, curvature=curvature, tau=None, attn_mask=None, full_lorentz=False,
                            check_inputs=True, acosh_eps=None, beta=coef_kw.get("beta"), scale=coef_kw.get("scale"),
                            **kw)
    p, lse, v_lifted = attention_probabilities(problem)
    if kw["score"] == "euclidean":
        o = p @ v_lifted
        return o, torch.zeros_like(o[..., 0])
    vs = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    lam = (v_lifted[..., 1:].norm(dim=-1) / vs.norm(dim=-1).clamp_min(1e-300))  # (B,H,M)
    pl = p * lam.unsqueeze(-2)
    if source == "exact":
        return pl @ vs, (p @ v_lifted[..., 0:1])[..., 0]
    if source == "stage0":
        o_s, o0 = pl @ vs, p @ v_lifted[..., 0:1]
        return o_s.float().double(), o0[..., 0].float().double()
    if source.startswith("hilo"):  # the forward's P·λ as hi + lo in the dtype
        hi = pl.to(dtype).double()
        o_s = (hi + (pl - hi).to(dtype).double()) @ vs
        source = source[4:] or "fwd32"
    else:
        o_s = pl.to(dtype).double() @ vs
    o0 = (p @ v_lifted[..., 0:1])[..., 0]
    kap = curvature.view(1, -1, 1, 1)
    y = geometry.centroid_epilogue(torch.cat([o0.unsqueeze(-1), o_s], -1), kap, kw["output"]).float()
    if source == "fwd8":
        y = refine8(y, y.to(dtype), dtype)
    elif source == "out":
        y = y.to(dtype).double()
    y = y.double()
    o0 = o0.float().double()
    # O_s rebuilt from y (epilogue_pullback's o_s): the pull-back then sees y again through the epilogue
    _, _, o_s, _ = cb.epilogue_pullback(torch.zeros_like(y), y, o0, curvature, OUTPUT_IDS[kw["output"]])
    return o_s, o0


class Emulated(DenseKernels):
    def __init__(self, kw, dtype, source):
        super().__init__(kw)
        self.dtype, self.source = dtype, source.split("+")[0]
        # "+delta": the delta pass for every score, "+nodelta": for none; otherwise for poincare_distance only
        # (FusedKernels' policy)
        self.delta_pass = source.endswith("+delta") or (kw["score"] == "poincare_distance"
                                                          and not source.endswith("+nodelta"))

    def prepare(self, dout, out, out_refine, o0, curvature, output, dtype):
        # the driver's out is exact here; the emulated source gives O, hence y
        o_s, o0 = forward_o(*self.qkv, curvature, self.coef, self.kw, self.dtype, self.source)
        oid = {1: "lorentz", 2: "klein", 3: "poincare"}.get(output)
        y = o_s if oid is None else geometry.centroid_epilogue(torch.cat([o0.unsqueeze(-1), o_s], -1),
                                                              curvature.view(1, -1, 1, 1), oid)
        return cb.prepare_backward(dout, y, o0, curvature, output, self.dtype)

    def bwd(self, q, k, v, dout_hi, dout_lo, lse, delta, dout0, *rest):
        if self.delta_pass:  # D_i = Σ_j P_ij dP_ij of the backward's own P = dO_L·O_L at the exact O
            o_s, o0 = forward_o(q, k, v, rest[3], rest[4], dict(self.kw, key_padding_mask=rest[5]), self.dtype, "exact")
            d_s = dout_hi.double() + (0 if dout_lo is None else dout_lo.double())
            delta = (d_s * o_s).sum(-1) + dout0.double() * o0
        return cb.contractions_reference(q, k, v, dout_hi, dout_lo, lse, delta, dout0, *rest[3:5], rest[5],
                                         rest[6], rest[7], rest[8], rest[9], rounding=self.dtype)


def main():
    args = sys.argv[1:]
    only = args.pop(args.index("--score") + 1) if "--score" in args else None  # one score family
    args = [a for a in args if a != "--score"]
    sources = tuple(args) or ("stage0", "fwd32", "fwd8", "out")
    worst = {s: 0.0 for s in sources}
    for dtype in (torch.bfloat16, torch.float16):
        for D, N, M in ((64, 200, 130), (128, 63, 257)):
            for score, output, mode in [c for c in CUDA_CASES if only in (None, c[0])]:
                leaves, kw, dout = make_grad_case(score, output, N=N, M=M, D=D, mode=mode)
                args = [x.detach().to(dtype).double() for x in leaves[:3]]
                params = [x.detach() for x in leaves[3:]]
                dout_r = dout.to(dtype)
                _, truth = grads_of([x.clone().requires_grad_() for x in args + params], kw, dout_r.double(),
                                    "reference")
                _, ref = grads_of([x.to(dtype).requires_grad_() for x in args] +
                                  [x.float().requires_grad_() for x in params], kw, dout_r, "reference")
                lse, _, o0, eps = forward_stats(*args, *params, kw)
                out = call(*args, *params, kw, "reference").detach()
                line = []
                for src in sources:
                    kern = Emulated(kw, dtype, src)
                    kern.qkv, kern.coef = args, params[1]
                    got = cb.backward_in_passes(kern, dout_r.double(), *args, out, torch.empty(0, dtype=torch.int8),
                                                lse, o0, *params, kw["key_padding_mask"], SCORE_IDS[score],
                                                OUTPUT_IDS[output], kw["causal"], kw["squared"], eps, False,
                                                scratch_bytes=1 << 40)
                    ratios = []
                    for g, r, t in zip(got, ref, truth):
                        scale = max(t.abs().max().item(), 1.0)
                        e_g = (g.to(dtype).double() if g.dim() > 1 else g.float().double()) - t
                        e_r = (r.double() - t).abs().max().item()
                        ratios.append(e_g.abs().max().item() / (2 * e_r + GRAD_FLOOR[dtype] * scale))
                    worst[src] = max(worst[src], max(ratios))
                    line.append(f"{src} {max(ratios):.2f}({'qkvcb'[ratios.index(max(ratios))]})")
                print(f"{str(dtype)[6:]:8s} D={D:3d} {score:17s} {output:9s} {mode:17s} " + "  ".join(line), flush=True)
    print("worst", worst)


if __name__ == "__main__":
    main()
