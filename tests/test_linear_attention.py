"""score="linear" (Hypformer's focused linear attention): formula, O(N) forms, gradients, masks, decoding.

The references are independent of the code under test: Hypformer's formula written out below in its
own ``[N, H, D]`` layout, the quadratic reference backend (softmax of log-weights), explicit
triangular sums, and float64 autograd.
"""
import pytest
import torch
import torch.nn.functional as F

import hyptorch_flash as hf
from attention_cases import assert_close_to_truth
from hyptorch_flash.layers import HyperbolicMultiheadAttention, KVCache, LorentzTransformerDecoder
from hyptorch_flash.layers.testing import random_lorentz_points
from hyptorch_flash.ops import LinearAttentionState, backends, linear_attention_with_state
from hyptorch_flash.ops.focused_linear import CausalLinearScan, chunked_scan
from hyptorch_flash.ops.linear_attention import linear_attention
from hyptorch_flash.ops.problem import build_problem

F64 = torch.float64


def qkv(B=2, H=4, Hkv=2, N=13, M=None, D=6, Dv=5, *, scale=1.0, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    M = N if M is None else M
    return tuple((torch.randn(shape, generator=g, dtype=F64) * scale).to(dtype)
                 for shape in ((B, H, N, D), (B, Hkv, M, D), (B, Hkv, M, Dv)))


def lift(space, k):
    return torch.cat([(k + space.square().sum(-1, keepdim=True)).sqrt(), space], -1)


def hypformer_formula(q, k, v, *, power, curvature=1.0, v_map=None, norm_scale=0.7):
    """Hypformer's TransConvLayer.linear_focus_attention per batch element, in its [N, H, D] layout.

    Returns full Lorentz points (B, H, N, Dv+1). ``norm_scale`` is Hypformer's learnable divisor of
    the features (it cancels, so any value gives the same result). Hypformer divides by
    ``denominator + 1e-6``; we divide exactly (see the module docstring of linear_attention.py), so
    the epsilon is left out here (with it, rows whose query has few positive coordinates, so a
    small φ(q), differ by up to 20% on these inputs).
    """
    def fp(x, p):
        return (torch.norm(x, p=2, dim=-1, keepdim=True) / torch.norm(x ** p, p=2, dim=-1, keepdim=True)) * x ** p

    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    outs = []
    for b in range(q.shape[0]):
        qs, ks, vs = (t[b].transpose(0, 1) for t in (q, k, v))  # [N, H, D]
        phi_qs = fp((F.relu(qs) + 1e-6) / (abs(norm_scale) + 1e-6), power)
        phi_ks = fp((F.relu(ks) + 1e-6) / (abs(norm_scale) + 1e-6), power)
        k_transpose_v = torch.einsum("nhm,nhd->hmd", phi_ks, vs)
        numerator = torch.einsum("nhm,hmd->nhd", phi_qs, k_transpose_v)
        denominator = torch.einsum("nhd,hd->nh", phi_qs, torch.einsum("nhd->hd", phi_ks)).unsqueeze(-1)
        out = numerator / denominator
        if v_map is not None:
            out = out + v_map(vs)
        time = ((out ** 2).sum(dim=-1, keepdim=True) + curvature) ** 0.5
        outs.append(torch.cat([time, out], dim=-1).transpose(0, 1))
    return torch.stack(outs)


def causal_quadratic(q, k, v, *, power):
    """Explicit O(N²) causal linear attention (space part), written with the Hypformer feature map."""
    def phi(x):
        u = F.relu(x) + 1e-6
        return u.norm(dim=-1, keepdim=True) * u ** power / (u ** power).norm(dim=-1, keepdim=True)

    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    w = (phi(q) @ phi(k).transpose(-1, -2)).tril()
    return (w @ v) / w.sum(-1, keepdim=True)


# --- the formula -------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "blockwise"])
def test_noncausal_equals_hypformer_formula(backend):
    q, k, v = qkv(N=11, D=6, Dv=6)
    v_map = torch.nn.Linear(6, 6).double()
    # full Lorentz points in and out (scalar curvature: a GQA key head is shared by query heads)
    got = hf.hyperbolic_attention(lift(q, 1.7), lift(k, 1.7), lift(v, 1.7), score="linear", power=3.0,
                                  curvature=1.7, value_map=v_map, full_lorentz=True, backend=backend)
    want = hypformer_formula(q, k, v, power=3.0, curvature=1.7, v_map=v_map)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_default_power_is_hypformers_two_and_space_part_is_curvature_free():
    q, k, v = qkv(N=9)
    a = hf.hyperbolic_attention(q, k, v, score="linear", curvature=0.3, backend="blockwise")
    b = hf.hyperbolic_attention(q, k, v, score="linear", curvature=2.5, power=2.0, backend="blockwise")
    want = hypformer_formula(q, k, v, power=2.0)[..., 1:]
    torch.testing.assert_close(a, want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(b, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("k_curv", [0.3, 1.0, 2.5])
def test_output_charts_and_manifold(k_curv):
    q, k, v = qkv(N=10, seed=1, scale=3.0)
    kw = dict(score="linear", curvature=k_curv, backend="blockwise", causal=True)
    full = hf.hyperbolic_attention(*(lift(t, k_curv) for t in (q, k, v)), full_lorentz=True, **kw)
    x0, xs = full[..., :1], full[..., 1:]
    assert (x0 > 0).all()
    torch.testing.assert_close(-x0 ** 2 + (xs ** 2).sum(-1, keepdim=True), torch.full_like(x0, -k_curv),
                               atol=1e-10 * x0.max().item() ** 2, rtol=0)
    sk = k_curv ** 0.5
    klein = hf.hyperbolic_attention(q, k, v, output="klein", **kw)
    poincare = hf.hyperbolic_attention(q, k, v, output="poincare", **kw)
    torch.testing.assert_close(klein, sk * xs / x0, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(poincare, sk * xs / (x0 + sk), atol=1e-12, rtol=1e-12)
    assert (klein.norm(dim=-1) < sk).all() and (poincare.norm(dim=-1) < sk).all()


# --- the O(N) forms ------------------------------------------------------------------------------

@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("chunk", [1, 3, 8, 128])
def test_chunked_scan_equals_triangular_sum(chunk, reverse):
    a, b, c = qkv(B=1, H=2, Hkv=2, N=17, D=4, Dv=3, seed=2)
    state = torch.randn(1, 2, 4, 3, dtype=F64)
    out, final = chunked_scan(a, b, c, chunk=chunk, reverse=reverse, state=state)
    w = a @ b.transpose(-1, -2)
    want = (w.triu() if reverse else w.tril()) @ c + a @ state
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(final, state + b.transpose(-1, -2) @ c, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("N,M", [(37, 37), (29, 40), (40, 29), (1, 5)])
def test_chunked_causal_equals_quadratic_fp64(N, M):
    q, k, v = qkv(N=N, M=M, seed=3)
    pad = torch.rand(2, M, generator=torch.Generator().manual_seed(1)) < 0.25
    kw = dict(score="linear", causal=True, key_padding_mask=pad, power=2.5)
    ref, ref_lse = hf.hyperbolic_attention(q, k, v, backend="reference", return_lse=True, **kw)
    problem = build_problem(q, k, v, output=None, curvature=1.0, tau=None, scale=None, beta=None, squared=False,
                            attn_mask=None, full_lorentz=False, check_inputs=True, acosh_eps=None,
                            **{**kw, "power": 2.5})
    for chunk in (4, 7, 128):
        out, lse = linear_attention(problem, chunk=chunk)
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(lse, ref_lse, atol=1e-12, rtol=1e-12)  # −inf rows match too
    if N == M:  # and against the independent triangular formula (no padding)
        plain = hf.hyperbolic_attention(q, k, v, score="linear", causal=True, power=2.5, backend="blockwise")
        torch.testing.assert_close(plain, causal_quadratic(q, k, v, power=2.5), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_fp32_within_twice_reference_error(causal):
    """fp32 blockwise (chunked scan) vs the fp64 truth: error ≤ 2·err(fp32 reference) + 1e-6 relative."""
    q, k, v = qkv(B=1, H=2, Hkv=2, N=300, D=16, Dv=16, seed=4, scale=2.0)
    kw = dict(score="linear", causal=causal, power=2.0, value_map=lambda t: 0.5 * t)
    truth = hf.hyperbolic_attention(q, k, v, backend="reference", **kw)
    q32, k32, v32 = (t.float().requires_grad_() for t in (q, k, v))
    ref = hf.hyperbolic_attention(q32, k32, v32, backend="reference", **kw)
    problem = build_problem(q32, k32, v32, output=None, curvature=1.0, tau=None, scale=None, beta=None,
                            squared=False, attn_mask=None, key_padding_mask=None, full_lorentz=False,
                            check_inputs=True, acosh_eps=None, **kw)
    got = linear_attention(problem, chunk=64)[0]  # several chunks
    assert_close_to_truth("out", got, ref, truth, floor_rel=1e-6)
    upstream = torch.randn_like(truth)
    grads_truth = torch.autograd.grad(hf.hyperbolic_attention(*(t.requires_grad_() for t in (q, k, v)),
                                                              backend="reference", **kw), (q, k, v), upstream)
    grads_ref = torch.autograd.grad(ref, (q32, k32, v32), upstream.float())
    grads_got = torch.autograd.grad(got, (q32, k32, v32), upstream.float())
    for name, g, r, t in zip("qkv", grads_got, grads_ref, grads_truth):
        assert_close_to_truth(f"d{name}", g, r, t, floor_rel=1e-6)


def test_causal_backward_keeps_no_per_position_state():
    """Saved activations of a causal fwd are O(N·D): far below the N·D·Dv of per-position states."""
    B, H, N, D = 1, 2, 512, 64
    q, k, v = (t.float().requires_grad_() for t in qkv(B=B, H=H, Hkv=H, N=N, D=D, Dv=D, seed=5))

    def saved_elements(n, d):
        q, k, v = (t.float().requires_grad_() for t in qkv(B=B, H=H, Hkv=H, N=n, D=d, Dv=d, seed=5))
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            out = hf.hyperbolic_attention(q, k, v, score="linear", causal=True, backend="blockwise")
        out.sum().backward()
        assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
        return sum(saved)

    base = saved_elements(N, D)
    assert base < 32 * B * H * N * (2 * D + 1), base  # a few (N, D) tensors (features, scan inputs, epilogue)
    assert saved_elements(2 * N, D) / base < 2.1  # linear in N
    assert saved_elements(N, 2 * D) / base < 2.1  # linear in D: no (N, D, Dv) or per-chunk (D, Dv) states


# --- gradients -------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_with_learnable_power_curvature_and_value_map(causal):
    q, k, v = (t.requires_grad_() for t in qkv(B=1, H=2, Hkv=1, N=6, D=3, Dv=3, seed=6))
    power = torch.tensor([2.0, 3.5], dtype=F64, requires_grad=True)
    curv = torch.tensor([0.7, 1.8], dtype=F64, requires_grad=True)
    weight = (torch.randn(3, 3, dtype=F64) * 0.5).requires_grad_()
    bias = torch.randn(3, dtype=F64).requires_grad_()
    pad = torch.tensor([[False, False, True, False, False, False]])

    def fn(q, k, v, power, curv, weight, bias):
        return hf.hyperbolic_attention(q, k, v, score="linear", causal=causal, power=power, curvature=curv,
                                       key_padding_mask=pad, value_map=lambda t: t @ weight.T + bias,
                                       output="poincare", backend="blockwise")

    assert torch.autograd.gradcheck(fn, (q, k, v, power, curv, weight, bias), atol=1e-8, rtol=1e-6)


def test_gradcheck_causal_scan_across_chunks():
    a, b, c = (t.requires_grad_() for t in qkv(B=1, H=1, Hkv=1, N=10, D=3, Dv=2, seed=7))
    assert torch.autograd.gradcheck(lambda a, b, c: CausalLinearScan.apply(a, b, c, 3), (a, b, c))


@pytest.mark.parametrize("causal", [False, True])
def test_gradients_match_reference_with_gqa_and_padding(causal):
    q, k, v = qkv(B=2, H=6, Hkv=2, N=21, seed=8)
    pad = torch.zeros(2, 21, dtype=torch.bool)
    pad[0, 3], pad[1, -4:] = True, True
    power = torch.linspace(1.5, 4.0, 6, dtype=F64)
    upstream = torch.randn(2, 6, 21, 5, dtype=F64)
    grads = {}
    for backend in ("reference", "blockwise"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, power)]
        out = hf.hyperbolic_attention(*leaves[:3], score="linear", causal=causal, power=leaves[3],
                                      key_padding_mask=pad, output="poincare", backend=backend)
        grads[backend] = torch.autograd.grad(out, leaves, upstream)
    for g_ref, g in zip(grads["reference"], grads["blockwise"]):
        torch.testing.assert_close(g, g_ref, atol=1e-11, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_large_norms_stay_finite(dtype, causal):
    q, k, v = qkv(N=40, D=8, Dv=8, seed=9, scale=1e3 / 8 ** 0.5)
    q[0, 0, 0] = torch.tensor([1e3, 1e-3, -1e3, 0.5, 1e3, 2.0, -3.0, 1e-6], dtype=F64)
    for backend in ("reference", "blockwise"):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = hf.hyperbolic_attention(*leaves, score="linear", causal=causal, power=6.0, output="klein",
                                      backend=backend)
        out.float().square().sum().backward()
        assert torch.isfinite(out.float()).all(), backend
        assert all(torch.isfinite(t.grad.float()).all() for t in leaves), backend


# --- masks, shapes, curvature --------------------------------------------------------------------

def test_padded_keys_are_ignored_and_fully_padded_rows_give_the_origin():
    q, k, v = qkv(B=2, N=9, seed=10)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[0, [1, 5]] = True
    pad[1] = True  # batch 1 sees nothing
    k2, v2 = k.clone(), v.clone()
    k2[0, :, [1, 5]] += 7.0
    v2[0, :, [1, 5]] -= 3.0
    for causal in (False, True):
        kw = dict(score="linear", causal=causal, key_padding_mask=pad, backend="blockwise")
        a = hf.hyperbolic_attention(q, k, v, **kw)
        torch.testing.assert_close(hf.hyperbolic_attention(q, k2, v2, **kw), a, atol=1e-12, rtol=1e-12)
        assert (a[1] == 0).all()
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        hf.hyperbolic_attention(*leaves, **kw)[1].sum().backward()
        assert all(torch.isfinite(t.grad).all() and (t.grad[1] == 0).all() for t in leaves)


@pytest.mark.parametrize("causal", [False, True])
def test_gqa_equals_repeated_heads(causal):
    q, k, v = qkv(H=6, Hkv=2, N=15, seed=11)
    kw = dict(score="linear", causal=causal, backend="blockwise", power=torch.tensor([1.0, 2, 3, 4, 5, 6]))
    torch.testing.assert_close(hf.hyperbolic_attention(q, k, v, **kw),
                               hf.hyperbolic_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), **kw),
                               atol=1e-12, rtol=1e-12)


def test_full_lorentz_inputs_and_bool_attn_mask_in_reference():
    q, k, v = qkv(N=8, seed=12)
    kw = dict(score="linear", curvature=1.5, backend="blockwise")
    full_in = [lift(t, 1.5) for t in (q, k, v)]
    torch.testing.assert_close(hf.hyperbolic_attention(*full_in, full_lorentz=True, **kw),
                               lift(hf.hyperbolic_attention(q, k, v, **kw), 1.5), atol=1e-12, rtol=1e-12)
    causal_mask = torch.ones(8, 8, dtype=torch.bool).tril()
    torch.testing.assert_close(
        hf.hyperbolic_attention(q, k, v, score="linear", attn_mask=causal_mask, backend="reference"),
        hf.hyperbolic_attention(q, k, v, score="linear", causal=True, backend="blockwise"), atol=1e-12, rtol=1e-12)
    w = hf.hyperbolic_attention_weights(q, k, score="linear", causal=True)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 8, dtype=F64))
    assert (w.triu(1) == 0).all()


def test_backend_selection():
    q, k, v = qkv(N=4)
    problem = build_problem(q, k, v, score="linear", output=None, curvature=1.0, tau=None, scale=None, beta=None,
                            squared=False, causal=True, attn_mask=None, key_padding_mask=None, full_lorentz=False,
                            check_inputs=True, acosh_eps=None)
    assert backends.select_backend(problem, "auto").name == "blockwise"
    with pytest.raises(RuntimeError, match=r"backend 'cuda' cannot run these inputs: score='linear' has no fused "
                                           r"CUDA kernel \(the blockwise backend runs its O\(N\) form"):
        hf.hyperbolic_attention(q, k, v, score="linear", backend="cuda")
    mask = torch.ones(4, 4, dtype=torch.bool)
    with pytest.raises(RuntimeError, match=r"backend 'blockwise' cannot run these inputs: a dense attn_mask with "
                                           r"score='linear'"):
        hf.hyperbolic_attention(q, k, v, score="linear", attn_mask=mask, backend="blockwise")
    problem.mask.attn_mask = mask[None, None]
    assert backends.select_backend(problem, "auto").name == "reference"


def test_errors():
    q, k, v = qkv(N=5)
    lin = dict(score="linear", backend="blockwise")
    with pytest.raises(ValueError, match=r"tau/scale/beta do not apply to score='linear'"):
        hf.hyperbolic_attention(q, k, v, tau=2.0, **lin)
    with pytest.raises(ValueError, match=r"power must be > 0, got -1.0"):
        hf.hyperbolic_attention(q, k, v, power=-1.0, **lin)
    with pytest.raises(ValueError, match=r"power must be > 0, got \[2.0, 0.0, 1.0, 1.0\]"):
        hf.hyperbolic_attention(q, k, v, power=torch.tensor([2.0, 0.0, 1.0, 1.0]), **lin)
    with pytest.raises(ValueError, match=r"power applies to score='linear', not to score='lorentz_dot'"):
        hf.hyperbolic_attention(q, k, v, score="lorentz_dot", power=2.0)
    with pytest.raises(ValueError, match=r"value_map is Hypformer's value-mapping term of score='linear', not of "
                                         r"score='distance'"):
        hf.hyperbolic_attention(q, k, v, score="distance", value_map=lambda t: t)
    with pytest.raises(TypeError, match=r"value_map must be callable"):
        hf.hyperbolic_attention(q, k, v, value_map=3, **lin)
    with pytest.raises(ValueError, match=r"value_map adds the query token's own mapped value, so it needs N = M"):
        hf.hyperbolic_attention(q, k[:, :, :4], v[:, :, :4], value_map=lambda t: t, **lin)
    with pytest.raises(ValueError, match=r"value_map must map v of shape \(2, 2, 5, 5\) to a tensor of the same "
                                         r"shape, got \(2, 2, 5, 4\)"):
        hf.hyperbolic_attention(q, k, v, value_map=lambda t: t[..., :4], **lin)
    state = LinearAttentionState()
    linear_attention_with_state(q[:, :, :2], k[:, :, :2], v[:, :, :2], state)
    with pytest.raises(ValueError, match=r"state of shape \(2, 4, 6, 6\) does not continue queries"):
        linear_attention_with_state(q[:, :, 2:], k[:, :, 2:], v[:, :, 2:, :3], state)


# --- decoding ------------------------------------------------------------------------------------

@pytest.mark.parametrize("pieces", [(1,) * 12, (5, 1, 4, 2)])
def test_recurrent_state_equals_full_causal(pieces):
    q, k, v = qkv(H=4, Hkv=2, N=12, D=6, Dv=6, seed=13)
    pad = torch.rand(2, 12, generator=torch.Generator().manual_seed(3)) < 0.3
    v_map = torch.nn.Linear(6, 6).double()
    kw = dict(power=torch.tensor([1.5, 2.0, 3.0, 2.5], dtype=F64), value_map=v_map, output="poincare",
              curvature=torch.tensor([0.5, 1.0, 2.0, 1.2], dtype=F64))
    full = hf.hyperbolic_attention(q, k, v, score="linear", causal=True, key_padding_mask=pad, backend="blockwise",
                                   **kw)
    state, outs, start = LinearAttentionState(), [], 0
    with torch.no_grad():
        for n in pieces:
            sl = slice(start, start + n)
            outs.append(linear_attention_with_state(q[:, :, sl], k[:, :, sl], v[:, :, sl], state,
                                                    key_padding_mask=pad[:, sl], chunk=2, **kw))
            start += n
    assert state.length == 12
    torch.testing.assert_close(torch.cat(outs, 2), full, atol=1e-12, rtol=1e-12)


def test_layer_decoding_with_kv_cache_equals_full_causal():
    torch.manual_seed(14)
    mha = HyperbolicMultiheadAttention(8, 4, num_kv_heads=2, score="linear", rotary=True, learnable_scale=True,
                                       per_head_curvature=True, attn_backend="blockwise").double()
    x = random_lorentz_points(2, 9, 8, scale=1.5, dtype=F64)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, 2] = True
    full, _ = mha(x, is_causal=True, key_padding_mask=pad)
    cache = KVCache()
    with torch.no_grad():
        steps = [mha(x[:, a:b], is_causal=True, key_padding_mask=pad[:, :b], cache=cache)[0]
                 for a, b in ((0, 4), (4, 5), (5, 8), (8, 9))]
    assert cache.length == 9 and cache.key is None
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-12, rtol=1e-12)
    with torch.no_grad():
        _, weights = mha(x, is_causal=True, key_padding_mask=pad, need_weights=True)  # reference weights
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 9, dtype=F64))
    assert (weights.triu(1) == 0).all() and (weights[1, :, 2] == 0).all()
    with pytest.raises(ValueError, match=r"score='linear' with a KVCache keeps only the recurrent state"):
        mha(x[:, :1], attn_mask=torch.zeros(1, 10, dtype=torch.bool), cache=cache)
    with pytest.raises(ValueError, match=r"holds a score='linear' layer's recurrent state"):
        cache.update(x[:, None], x[:, None])


def test_layer_value_map_and_backends_agree():
    torch.manual_seed(15)
    mha = HyperbolicMultiheadAttention(8, 2, score="linear", power=3.0).double()
    x = random_lorentz_points(2, 7, 8, dtype=F64)
    outs = {}
    for backend in ("reference", "blockwise"):
        mha.attn_backend = backend
        outs[backend] = mha(x, is_causal=True)[0]
    torch.testing.assert_close(outs["reference"], outs["blockwise"], atol=1e-12, rtol=1e-12)
    outs["blockwise"].square().sum().backward()
    assert mha.value_map.weight.grad.abs().sum() > 0 and "log_coef" in dict(mha.named_buffers())  # p fixed
    with torch.no_grad():
        mha.value_map.weight.mul_(2.0)
        assert (mha(x, is_causal=True)[0] - outs["blockwise"]).abs().max() > 1e-3  # the term is used


def test_decoder_stack_decoding_equals_full():
    torch.manual_seed(16)
    dec = LorentzTransformerDecoder(2, 8, 2, 16, cross_attention=False, score="linear",
                                    attn_backend="blockwise").double().eval()
    x = random_lorentz_points(1, 6, 8, dtype=F64)
    full = dec(x)
    cache = dec.new_cache()
    with torch.no_grad():
        steps = [dec(x[:, i:i + 1], cache=cache) for i in range(6)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-12, rtol=1e-12)
