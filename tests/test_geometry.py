"""Geometry helpers: curvature forms, chart maps, centroid epilogues — checked by identities and geoopt."""
import geoopt
import pytest
import torch

from hyptorch_flash import geometry

torch.manual_seed(0)


def _lorentz_points(shape, k, scale=1.5):
    xs = torch.randn(shape, dtype=torch.float64) * scale
    return geometry.lift(xs, torch.as_tensor(k, dtype=torch.float64))


@pytest.mark.parametrize("form", ["float", "tensor0", "per_head", "lorentz", "poincare"])
def test_resolve_curvature_forms(form):
    k_expected = torch.tensor([0.5, 2.0], dtype=torch.float64)
    value = {
        "float": 0.7,
        "tensor0": torch.tensor(0.7),
        "per_head": k_expected,
        "lorentz": geoopt.Lorentz(k=0.7),
        "poincare": geoopt.PoincareBall(c=1 / 0.7),
    }[form]
    k = geometry.resolve_curvature(value, num_heads=2)
    expected = k_expected if form == "per_head" else torch.tensor(0.7)
    torch.testing.assert_close(k.double(), expected.double(), rtol=1e-6, atol=0)


def test_resolve_curvature_errors():
    with pytest.raises(ValueError, match="must be > 0"):
        geometry.resolve_curvature(-1.0)
    with pytest.raises(ValueError, match="must be > 0"):
        geometry.resolve_curvature(torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="finite"):
        geometry.resolve_curvature(float("nan"))
    with pytest.raises(ValueError, match="3 entries but the query has 2 heads"):
        geometry.resolve_curvature(torch.ones(3), num_heads=2)
    with pytest.raises(TypeError, match="curvature must be"):
        geometry.resolve_curvature("one")
    with pytest.raises(ValueError, match="not hyperbolic"):
        geometry.resolve_curvature(geoopt.Stereographic(k=0.5))


def test_time_coordinate_is_float32_for_half_inputs_and_on_manifold():
    xs = (torch.randn(4, 7) * 8).to(torch.bfloat16)
    x0 = geometry.time_coordinate(xs, torch.tensor(1.3))
    assert x0.dtype == torch.float32
    full = torch.cat([x0, xs.float()], dim=-1)
    residual = geometry.minkowski_inner(full, full) + 1.3
    assert residual.abs().max() <= 1e-5 * x0.max() ** 2


def test_minkowski_inner_and_project_match_definitions():
    k = torch.tensor(0.8, dtype=torch.float64)
    x, y = _lorentz_points((5, 4), k), _lorentz_points((5, 4), k)
    manual = -x[:, 0] * y[:, 0] + (x[:, 1:] * y[:, 1:]).sum(-1)
    torch.testing.assert_close(geometry.minkowski_inner(x, y), manual)
    torch.testing.assert_close(geometry.minkowski_inner(x, x), -k.expand(5))
    off = x.clone()
    off[:, 0] += 0.3
    torch.testing.assert_close(geometry.project(off, k), x)


@pytest.mark.parametrize("k", [0.4, 1.0, 2.5])
def test_chart_maps_are_inverse_and_isometric(k):
    kt = torch.tensor(k, dtype=torch.float64)
    x, y = _lorentz_points((6, 5), kt), _lorentz_points((6, 5), kt)
    p = geometry.lorentz_to_poincare(x, kt)
    kappa = geometry.lorentz_to_klein(x, kt)
    torch.testing.assert_close(geometry.poincare_to_lorentz(p, kt), x)
    torch.testing.assert_close(geometry.klein_to_lorentz(kappa, kt), x)
    torch.testing.assert_close(geometry.poincare_to_klein(p, kt), kappa)
    torch.testing.assert_close(geometry.klein_to_poincare(kappa, kt), p)
    # same distances in both charts: geoopt Lorentz(k) vs geoopt PoincareBall(c = 1/k)
    d_lorentz = geoopt.Lorentz(k=kt).dist(x, y)
    d_ball = geoopt.PoincareBall(c=1 / kt).dist(p, geometry.lorentz_to_poincare(y, kt))
    torch.testing.assert_close(d_lorentz, d_ball, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("k", [0.8, 1.0, 2.5])
def test_centroid_epilogues_are_one_point_in_three_charts(k):
    kt = torch.tensor(k, dtype=torch.float64)
    v = _lorentz_points((3, 9, 4), kt)
    w = torch.rand(3, 9, 1, dtype=torch.float64) + 0.1
    o = (w * v).sum(dim=1)
    y = geometry.lift(geometry.centroid_epilogue(o, kt, "lorentz"), kt)
    klein = geometry.centroid_epilogue(o, kt, "klein")
    ball = geometry.centroid_epilogue(o, kt, "poincare")
    torch.testing.assert_close(geometry.lorentz_to_klein(y, kt), klein)
    torch.testing.assert_close(geometry.lorentz_to_poincare(y, kt), ball)
    # the Lorentz centroid is on the manifold and scale-invariant in the weights
    torch.testing.assert_close(geometry.minkowski_inner(y, y), -kt.expand(3))
    torch.testing.assert_close(geometry.centroid_epilogue(7.0 * o, kt, "poincare"), ball)


@pytest.mark.parametrize("c", [0.8, 1.0, 2.5])
def test_poincare_epilogue_is_the_hnn_gyromidpoint(c):
    """DESIGN.md §2.4: ½⊗_c(Σ w λ p / Σ w (λ−1)) equals our Poincaré epilogue (HNN++, Shimizu 2021)."""
    ball = geoopt.PoincareBall(c=torch.tensor(c, dtype=torch.float64))
    k = torch.tensor(1 / c, dtype=torch.float64)
    p = ball.expmap0(torch.randn(7, 3, dtype=torch.float64))
    w = torch.rand(7, 1, dtype=torch.float64)
    lam = 2 / (1 - c * (p * p).sum(-1, keepdim=True))
    midpoint = ball.mobius_scalar_mul(torch.tensor(0.5, dtype=torch.float64), (w * lam * p).sum(0) / (w * (lam - 1)).sum(0))
    o = (w * geometry.poincare_to_lorentz(p, k)).sum(0)
    torch.testing.assert_close(geometry.centroid_epilogue(o, k, "poincare"), midpoint, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("output", geometry.OUTPUT_MODELS)
def test_centroid_of_one_point_is_the_point_and_masked_row_is_origin(output):
    k = torch.tensor(1.7, dtype=torch.float64)
    x = _lorentz_points((4, 3), k)
    expected = {"lorentz": x[:, 1:], "klein": geometry.lorentz_to_klein(x, k), "poincare": geometry.lorentz_to_poincare(x, k)}[output]
    torch.testing.assert_close(geometry.centroid_epilogue(0.3 * x, k, output), expected)
    o = torch.zeros(2, 4, dtype=torch.float64, requires_grad=True)
    y = geometry.centroid_epilogue(o, k, output)
    assert (y == 0).all()
    (g,) = torch.autograd.grad((y * torch.randn_like(y)).sum(), o)
    assert (g == 0).all()


def test_learnable_curvature_gets_gradients():
    k = torch.tensor([0.7, 1.4], dtype=torch.float64, requires_grad=True)
    xs = torch.randn(1, 2, 5, 3, dtype=torch.float64)
    o = (torch.rand(1, 2, 5, 1, dtype=torch.float64) * geometry.lift(xs, geometry.heads_view(k)))
    out = geometry.centroid_epilogue(o, geometry.heads_view(k), "poincare")
    out.sum().backward()
    assert k.grad is not None and torch.isfinite(k.grad).all() and (k.grad != 0).all()


def test_split_lorentz_checks_the_manifold():
    k = torch.tensor(1.0, dtype=torch.float64)
    x = _lorentz_points((3, 4), k)
    torch.testing.assert_close(geometry.split_lorentz(x, k), x[:, 1:])
    bad = x.clone()
    bad[1, 0] *= 1.01
    with pytest.raises(ValueError, match="not on the Lorentz manifold"):
        geometry.split_lorentz(bad, k)
    with pytest.raises(ValueError, match="last dim ≥ 2"):
        geometry.split_lorentz(x[:, :1], k)
    # bf16 storage of a projected point passes its dtype's tolerance
    geometry.split_lorentz(geometry.lift(torch.randn(8, 16) * 5, torch.tensor(1.0)).to(torch.bfloat16), torch.tensor(1.0))
