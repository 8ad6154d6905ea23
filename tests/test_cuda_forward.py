"""The fused CUDA forward (backend ``cuda``) against float64 truth, relative to the reference backend.

For every score × output × dtype × mask mode × (N, M) × head dim: err(cuda) ≤ 2·err(reference in the
same dtype) + one unit roundoff of the dtype (relative to the output's scale), both against the
reference backend on float64 copies of the same inputs (STYLE.md §3). Inputs are random (never zeros
or ones), with per-head curvature and coefficients. Also: LSE and the time coordinate o0 of the op,
masked rows, head-dim padding, ``torch.library.opcheck``, ``torch.compile(fullgraph=True)`` and the
reasons the backend gives for what it cannot run.
"""
from __future__ import annotations

import pytest
import torch

import hyptorch_flash as hf
from hyptorch_flash.ops import cuda_backend
from hyptorch_flash.ops.problem import build_problem
from hyptorch_flash.ops.reference import attention_probabilities

from attention_cases import SCORES, assert_close_to_truth, coefficient_kw, offset_copy, outputs_for, random_points

pytestmark = pytest.mark.cuda

# float32 runs the split-precision path (three bf16 parts per operand, six products per tile)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}
SIZES = ((1, 1), (63, 100), (128, 128), (1000, 777))
MODES = ("plain", "causal", "padded", "gqa_causal_padded")
VARIANTS = [(s, o) for s in SCORES for o in outputs_for(s)]


def make_case(score, *, B=2, H=4, N=63, M=100, D=64, Dv=None, mode="plain", norm_scale=0.25, seed=0, device="cuda"):
    """float64 inputs and keyword arguments of one call (per-head curvature and coefficient)."""
    gen = torch.Generator().manual_seed(seed)
    hkv = H // 2 if "gqa" in mode else H
    curvature = torch.rand(H, generator=gen, dtype=torch.float64) * 1.5 + 0.5
    coef = torch.rand(H, generator=gen, dtype=torch.float64) * 0.5 + (7.0 if score in ("lorentz_dot", "euclidean") else 0.5)
    pts = dict(score=score, generator=gen, norm_scale=norm_scale, curvature=curvature)
    q = random_points((B, H, N, D), **pts)
    k = random_points((B, hkv, M, D), **pts)
    v = random_points((B, hkv, M, Dv or D), **pts)
    kw = dict(score=score, curvature=curvature.to(device), causal="causal" in mode, **coefficient_kw(score, coef.to(device)))
    if "padded" in mode:
        pad = torch.rand(B, M, generator=gen) < 0.3
        pad[-1] = True  # the last batch element sees no key at all: output = origin, LSE = −inf
        kw["key_padding_mask"] = pad.to(device)
    return q.to(device), k.to(device), v.to(device), kw


def check_against_truth(q, k, v, kw, dtype, name):
    truth, truth_lse = hf.hyperbolic_attention(q, k, v, backend="reference", return_lse=True, **kw)
    args = [x.to(dtype) for x in (q, k, v)]
    ref, ref_lse = hf.hyperbolic_attention(*args, backend="reference", return_lse=True, **kw)
    got, got_lse = hf.hyperbolic_attention(*args, backend="cuda", return_lse=True, **kw)
    assert got.dtype == dtype and got.shape == truth.shape and got_lse.dtype == torch.float32
    assert_close_to_truth(f"{name} out", got, ref, truth, floor_rel=UNIT_ROUNDOFF[dtype])
    dead = torch.isinf(truth_lse)
    assert torch.equal(torch.isinf(got_lse), dead), f"{name}: LSE is -inf on other rows than the truth"
    if not dead.all():
        assert_close_to_truth(f"{name} lse", got_lse[~dead], ref_lse[~dead], truth_lse[~dead], floor_rel=2e-5)


@pytest.mark.parametrize("D", (64, 128))
@pytest.mark.parametrize("N,M", SIZES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("score,output", VARIANTS)
def test_forward_matches_float64(score, output, dtype, mode, N, M, D, request):
    if (score, output, dtype, mode, N, D) == ("poincare_distance", "lorentz", torch.float32, "gqa_causal_padded", 1000, 64):
        # Known gap of the split float32 path, kept visible (strict: it fails the suite once fixed).
        request.applymarker(pytest.mark.xfail(strict=True, reason=(
            "H100, session-3 device run 6: error 2.6e-6 vs the reference's 4.2e-7 (6x; every other float32 "
            "case of the grid is within 2x). Poincare-lifted values with the Lorentz output: O0^2 - |Os|^2 "
            "cancels; cause of the extra error not found yet")))
    q, k, v, kw = make_case(score, N=N, M=M, D=D, mode=mode, seed=N * 7 + D)
    check_against_truth(q, k, v, dict(kw, output=output), dtype, f"{score}/{output}/{mode}/N={N},M={M},D={D}")


@pytest.mark.parametrize("D", (64, 128))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("score,output", VARIANTS)
def test_forward_matches_float64_long(score, output, dtype, mode, D):
    """N = M = 4096 (many key tiles, every causal tile shape), one batch element × two heads."""
    q, k, v, kw = make_case(score, B=2 if "padded" in mode else 1, H=2, N=4096, M=4096, D=D, mode=mode, seed=D)
    check_against_truth(q, k, v, dict(kw, output=output), dtype, f"{score}/{output}/{mode}/N=4096,D={D}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ("plain", "causal"))
def test_squared_distance(dtype, mode):
    q, k, v, kw = make_case("distance", N=200, M=150, mode=mode, seed=3)
    check_against_truth(q, k, v, dict(kw, squared=True), dtype, f"squared distance/{mode}")


@pytest.mark.parametrize("score", ("lorentz_dot", "distance"))
def test_full_lorentz_output(score):
    q, k, v, kw = make_case(score, N=100, M=90, seed=5)
    truth = hf.hyperbolic_attention(q, k, v, backend="reference", full_lorentz=False, **kw)
    got = hf.hyperbolic_attention(*(x.bfloat16() for x in (q, k, v)), backend="cuda", **kw)
    full = hf.hyperbolic_attention(
        *(hf.geometry.lift(x, hf.geometry.heads_view(kw["curvature"])).bfloat16() for x in (q, k, v)),
        backend="cuda", full_lorentz=True, **kw,
    )
    assert full.shape[-1] == got.shape[-1] + 1
    # time coordinate on the manifold: x0² − |xs|² = k
    x = full.double()
    k_h = hf.geometry.heads_view(kw["curvature"]).squeeze(-1)
    assert torch.allclose(x[..., 0] ** 2 - (x[..., 1:] ** 2).sum(-1), k_h.expand_as(x[..., 0]), rtol=0.05)
    assert (got.double() - truth).abs().max() < 0.05 * truth.abs().max()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ("plain", "gqa_causal_padded"))
@pytest.mark.parametrize("score", ("distance", "poincare_distance"))
def test_reciprocal_distance_path(score, mode, dtype):
    """Heads with β·sqrt(k) = 1 (the default β = 1, k = 1, where exp(S) = 1/(z + sqrt(z² − 1))) next to one
    without, per-head curvature from 0.25 to 4."""
    gen = torch.Generator().manual_seed(21)
    curvature = torch.tensor([1.0, 4.0, 0.25, 2.0], dtype=torch.float64)
    beta = torch.tensor([1.0, 0.5, 2.0, 0.9], dtype=torch.float64)  # β·sqrt(k) = 1, 1, 1, 1.27
    B, H, N, M, D = 2, 4, 150, 97, 64
    hkv = 2 if "gqa" in mode else H
    pts = dict(score=score, generator=gen, norm_scale=0.25, curvature=curvature)
    q, k, v = (random_points(shape, **pts).cuda() for shape in ((B, H, N, D), (B, hkv, M, D), (B, hkv, M, D)))
    kw = dict(score=score, curvature=curvature.cuda(), beta=beta.cuda(), causal="causal" in mode)
    if "padded" in mode:
        pad = torch.rand(B, M, generator=gen) < 0.3
        pad[-1] = True
        kw["key_padding_mask"] = pad.cuda()
    check_against_truth(q, k, v, kw, dtype, f"reciprocal {score}/{mode}")


@pytest.mark.parametrize("score", ("lorentz_dot", "euclidean"))
def test_per_head_scale_of_both_signs(score):
    """A negative scale flips the row max into a row min; the kernel folds the sign into the score FFMA."""
    q, k, v, kw = make_case(score, N=150, M=130, mode="causal", seed=12)
    del kw["tau"]
    kw["scale"] = torch.tensor([0.3, -0.25, 0.2, -0.35], dtype=torch.float64, device="cuda")
    check_against_truth(q, k, v, kw, torch.bfloat16, f"{score} with scales of both signs")


@pytest.mark.parametrize("D,Dv", ((32, 32), (48, 80), (100, 128)))
def test_head_dims_are_padded(D, Dv):
    q, k, v, kw = make_case("lorentz_dot", N=70, M=65, D=D, Dv=Dv, seed=D)
    check_against_truth(q, k, v, kw, torch.bfloat16, f"padded head dims {D}/{Dv}")


@pytest.mark.parametrize("layout", ("transposed", "unaligned", "offset"))
def test_strided_inputs(layout):
    """(B, N, H, D) projections viewed as (B, H, N, D), rows that are not 16-byte aligned (stride 65), and
    contiguous inputs that start off a 16-byte boundary give exactly the result of contiguous inputs."""
    q, k, v, kw = make_case("lorentz_dot", N=100, M=80, mode="gqa_causal_padded", seed=9)
    args = [x.bfloat16() for x in (q, k, v)]
    if layout == "transposed":
        strided = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in args]
    elif layout == "unaligned":
        strided = [torch.nn.functional.pad(x, (0, 1))[..., :-1] for x in args]
    else:
        strided = [offset_copy(x) for x in args]
    if layout != "offset":  # (offset_copy asserts its own layout)
        assert not strided[0].is_contiguous()
    expected = hf.hyperbolic_attention(*args, backend="cuda", **kw)
    assert torch.equal(hf.hyperbolic_attention(*strided, backend="cuda", **kw), expected)


@pytest.mark.parametrize("score", SCORES)
def test_op_time_coordinate(score):
    """o0 = Σ_j P_ij v0_j of the normalised Lorentz average (0 for masked rows and euclidean scores)."""
    q, k, v, kw = make_case(score, N=130, M=70, mode="padded", seed=11)
    problem = build_problem(
        q, k, v, score=score, output=None, curvature=kw["curvature"], tau=kw.get("tau"), scale=None,
        beta=kw.get("beta"), squared=False, causal=False, attn_mask=None,
        key_padding_mask=kw["key_padding_mask"], full_lorentz=False, check_inputs=True, acosh_eps=None,
    )
    p, _, v_lifted = attention_probabilities(problem)
    truth_o0 = (p @ v_lifted)[..., 0] if score != "euclidean" else torch.zeros_like(p[..., 0])
    heads = q.shape[1]
    _, _, o0, _ = torch.ops.hyptorch_flash.attention_fwd(
        q.bfloat16(), k.bfloat16(), v.bfloat16(), cuda_backend._per_head(problem.curvature, heads, q.device),
        cuda_backend._per_head(problem.coef, heads, q.device), kw["key_padding_mask"],
        cuda_backend.SCORE_IDS[score], cuda_backend.OUTPUT_IDS[problem.output], False, False, problem.acosh_margin(),
    )
    assert o0.dtype == torch.float32
    scale = truth_o0.abs().max().item() + 1.0
    assert (o0.double() - truth_o0).abs().max().item() < 2e-2 * scale
    assert (o0[-1] == 0).all()  # the fully padded batch element


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=str)
@pytest.mark.parametrize("norm", (8.0, 30.0))
def test_large_norm_accuracy(norm, dtype):
    """|x_s| = 8 and 30: the split (space on tensor cores, time in fp32) keeps the error at rounding level."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 512, 64, generator=gen, dtype=torch.float64) for _ in range(3))
    q, k, v = (x / x.norm(dim=-1, keepdim=True) * norm for x in (q, k, v))
    q, k, v = (x.cuda() for x in (q, k, v))
    check_against_truth(q, k, v, dict(score="lorentz_dot"), dtype, f"|x_s| = {norm}")


def test_float32_is_not_rounded_to_bf16():
    """The float32 path is not bf16 in disguise: its error is far below bf16 rounding of the same inputs."""
    q, k, v, kw = make_case("distance", N=300, M=257, mode="causal", seed=31)
    truth = hf.hyperbolic_attention(q, k, v, backend="reference", **kw)
    got = hf.hyperbolic_attention(q.float(), k.float(), v.float(), backend="cuda", **kw)
    bf16 = hf.hyperbolic_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), backend="cuda", **kw)
    err, err_bf16 = ((x.double() - truth).abs().max().item() for x in (got, bf16))
    assert got.dtype == torch.float32 and err < 1e-3 * err_bf16


def op_args(score_id=2, output_id=1, seed=2):
    q, k, v, kw = make_case("distance", N=65, M=70, mode="padded", seed=seed)
    H = q.shape[1]
    return (
        q.bfloat16(), k.bfloat16(), v.bfloat16(), kw["curvature"].float(), kw["beta"].float().expand(H).contiguous(),
        kw["key_padding_mask"], score_id, output_id, False, False, 1e-6,
    )


@pytest.mark.parametrize("refine_output", (False, True))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32), ids=str)
def test_opcheck(dtype, refine_output):
    args = list(op_args())
    args[:3] = [x.to(dtype) for x in args[:3]]
    torch.library.opcheck(torch.ops.hyptorch_flash.attention_fwd, (*args, refine_output),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph():
    args = op_args()

    def fn(q, k, v, curvature, coef, pad):
        out, lse, o0, _ = torch.ops.hyptorch_flash.attention_fwd(q, k, v, curvature, coef, pad, *args[6:])
        return out.float() * 2.0, lse.exp(), o0

    compiled = torch.compile(fn, fullgraph=True)
    for a, b in zip(compiled(*args[:6]), fn(*args[:6])):
        assert torch.equal(a, b)


def test_auto_picks_cuda_and_reports_reasons():
    q, k, v, kw = make_case("lorentz_dot", N=32, M=32, seed=6)
    qb, kb, vb = (x.bfloat16() for x in (q, k, v))
    problem = build_problem(
        qb, kb, vb, score="lorentz_dot", output=None, curvature=1.0, tau=None, scale=None, beta=None,
        squared=False, causal=False, attn_mask=None, key_padding_mask=None, full_lorentz=False,
        check_inputs=True, acosh_eps=None,
    )
    assert cuda_backend.unsupported(problem) is None
    problem.q = q.float()
    assert cuda_backend.unsupported(problem) is None  # the split-precision float32 forward
    problem.q = q.float().requires_grad_()
    assert cuda_backend.unsupported(problem) is None  # and its split-precision backward
    problem.q = q
    assert "float64" in cuda_backend.unsupported(problem)
    with pytest.raises(RuntimeError, match="attn_mask"):
        hf.hyperbolic_attention(qb, kb, vb, attn_mask=torch.ones(32, 32, dtype=torch.bool, device="cuda"), backend="cuda")
    if not cuda_backend.BACKWARD_REGISTERED:
        with pytest.raises(RuntimeError, match="backward kernel is not registered"):
            hf.hyperbolic_attention(qb.requires_grad_(), kb, vb, backend="cuda")
