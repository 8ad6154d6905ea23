"""Forward benchmark of hyperbolic attention: the fused ``cuda`` backend against what a user has today.

Same run, same inputs (one setup factory), per configuration:

- ``cuda/<score>``: ``hyperbolic_attention(..., backend="cuda")`` for lorentz_dot, euclidean and distance;
- ``sdpa``: ``F.scaled_dot_product_attention`` on Euclidean inputs of the same shape (the yardstick);
- ``(a) sdpa_lorentz_pad``: SDPA on (D+1)-dim Lorentz heads [−q0 | q_s]·[k0 | k_s], zero-padded to a
  multiple of 8, values [v0 | v_s], then the centroid epilogue (what a user writes today);
- ``(b) flex_rank1``: FlexAttention on space coordinates with an fp32 ``score_mod`` subtracting
  scale·q0[i]·k0[j], values [v_s | v0], then the centroid;
- ``(c) flex_distance``: FlexAttention with the geodesic-distance ``score_mod``, then the centroid;
- ``(d) reference`` / ``blockwise`` backends at small N.

FLOPs follow flash-attention: fwd = 4·B·H·N²·D (D = space dim), halved if causal. Timing: warm-up,
then CUDA events around groups of back-to-back calls, median per call. Peak memory: ``max_memory_allocated`` over one call above
what the inputs hold. Error: max |out − truth| / max |truth|, truth = the reference backend on float64
copies of the inputs (the same function: lorentz_dot → Lorentz centroid, etc.).

Writes one JSON row per (method, shape) to ``--out`` (GPU name, torch and CUDA versions in every row),
a PNG plot of TFLOP/s against N, and with ``--profile`` a torch.profiler table of the cuda backend.

Example (the RESULTS.md figures)::

    python benchmarks/bench_attention.py --out benchmarks/results.jsonl --plot benchmarks/attention.png
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import hyptorch_flash as hf
from hyptorch_flash import geometry

CURVATURE = 1.0


@dataclass
class Inputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    causal: bool
    curvature: torch.Tensor  # device scalars, made once like a model's parameters: a Python float
    scale: torch.Tensor      # argument is copied to the GPU on every call, which stalls the host
    beta: torch.Tensor

    def score_kwargs(self, score):
        coef = {"beta": self.beta} if score == "distance" else {
            "scale": self.scale if score == "lorentz_dot" else self.scale / 2}
        return dict(score=score, causal=self.causal, curvature=self.curvature, **coef)

    @property
    def shape(self):
        return tuple(self.q.shape)


def make_inputs(B, H, N, D, *, dtype=torch.bfloat16, norm=None, causal=False, seed=0, device="cuda") -> Inputs:
    """Random space coordinates (never zeros/ones); ``norm`` fixes |x_s| of every point, else randn·0.5."""
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, D, generator=gen, device=device, dtype=torch.float32) for _ in range(3))
    if norm is not None:
        q, k, v = (x / x.norm(dim=-1, keepdim=True) * norm for x in (q, k, v))
    else:
        q, k, v = (x * 0.5 for x in (q, k, v))
    scalar = lambda value: torch.tensor(value, device=device)  # noqa: E731
    return Inputs(q.to(dtype), k.to(dtype), v.to(dtype), causal, scalar(CURVATURE), scalar(scale_of(D)), scalar(1.0))


def flops(B, H, N, D, causal) -> float:
    return 4.0 * B * H * N * N * D / (2.0 if causal else 1.0)


def scale_of(D) -> float:
    return 2.0 / math.sqrt(D)  # lorentz_dot default: s = (2/τ)<q,k>_L, τ = sqrt(D)


# --- methods: each takes Inputs and returns the output (B, H, N, D) ---

def cuda_backend(score):
    return backend_method("cuda", score)


def backend_method(name, score="lorentz_dot", out_dtype=None):
    def run(x: Inputs):
        return hf.hyperbolic_attention(x.q, x.k, x.v, backend=name, check_inputs=False, out_dtype=out_dtype,
                                       **x.score_kwargs(score))
    return run


def sdpa_euclidean(x: Inputs):
    return F.scaled_dot_product_attention(x.q, x.k, x.v, is_causal=x.causal)


def _time_coord(x):
    return geometry.time_coordinate(x, torch.tensor(CURVATURE, device=x.device))  # fp32 (..., 1)


def sdpa_lorentz_pad(x: Inputs):
    """(a) SDPA on Lorentz heads with q0 negated, zero-padded to a multiple of 8, then the centroid."""
    D = x.q.shape[-1]
    pad = (-(D + 1)) % 8
    dt = x.q.dtype
    qf = F.pad(torch.cat([-_time_coord(x.q).to(dt), x.q], -1), (0, pad))
    kf = F.pad(torch.cat([_time_coord(x.k).to(dt), x.k], -1), (0, pad))
    vf = F.pad(torch.cat([_time_coord(x.v).to(dt), x.v], -1), (0, pad))
    o = F.scaled_dot_product_attention(qf, kf, vf, is_causal=x.causal, scale=scale_of(D))
    y = geometry.centroid_epilogue(o[..., : D + 1].float(), torch.tensor(CURVATURE, device=o.device), "lorentz")
    return y.to(dt)


_flex = None


def _flex_attention():
    global _flex
    if _flex is None:
        from torch.nn.attention.flex_attention import flex_attention

        _flex = torch.compile(flex_attention, dynamic=False)
    return _flex


def _causal_block_mask(x: Inputs):
    from torch.nn.attention.flex_attention import create_block_mask

    B, H, N, _ = x.q.shape
    return create_block_mask(lambda b, h, i, j: j <= i, None, None, N, x.k.shape[2], device=x.q.device)


def _flex_with(x: Inputs, score_mod, scale):
    """Flex on space coordinates with values [v_s | v0] (padded to a multiple of 8), then the centroid."""
    D = x.q.shape[-1]
    dt = x.q.dtype
    vf = F.pad(torch.cat([x.v, _time_coord(x.v).to(dt)], -1), (0, (-(D + 1)) % 8))
    o = _flex_attention()(x.q, x.k, vf, score_mod=score_mod, scale=scale,
                          block_mask=_causal_block_mask(x) if x.causal else None)
    o = torch.cat([o[..., D : D + 1], o[..., :D]], -1).float()
    return geometry.centroid_epilogue(o, torch.tensor(CURVATURE, device=o.device), "lorentz").to(dt)


def flex_rank1(x: Inputs):
    """(b) score = scale·q_s·k_s − scale·q0[i]·k0[j] with q0, k0 in fp32."""
    D = x.q.shape[-1]
    s = scale_of(D)
    q0, k0 = _time_coord(x.q).squeeze(-1), _time_coord(x.k).squeeze(-1)

    def score_mod(score, b, h, i, j):
        return score - s * q0[b, h, i] * k0[b, h, j]

    return _flex_with(x, score_mod, s)


def flex_distance(x: Inputs):
    """(c) score = −β·d(q, k), d = sqrt(k)·arccosh(clamp(z)), z = (q0·k0 − q_s·k_s)/k, β = 1."""
    q0, k0 = _time_coord(x.q).squeeze(-1), _time_coord(x.k).squeeze(-1)
    eps = hf.numerics.acosh_margin(torch.float32)

    def score_mod(score, b, h, i, j):
        z = (q0[b, h, i] * k0[b, h, j] - score) / CURVATURE
        return -math.sqrt(CURVATURE) * torch.acosh(torch.clamp(z, min=1.0 + eps))

    return _flex_with(x, score_mod, 1.0)


def eager_same_dtype(x: Inputs):
    """Eager hyperbolic attention with every op in the input dtype (no upcast): the accuracy baseline."""
    D = x.q.shape[-1]
    k = torch.tensor(CURVATURE, device=x.q.device, dtype=x.q.dtype)
    q0, k0, v0 = ((k + (t * t).sum(-1, keepdim=True)).sqrt() for t in (x.q, x.k, x.v))
    s = scale_of(D) * (x.q @ x.k.transpose(-1, -2) - q0 @ k0.transpose(-1, -2))
    if x.causal:
        N, M = s.shape[-2:]
        s = s.masked_fill(torch.ones(N, M, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    o = torch.softmax(s, -1) @ torch.cat([v0, x.v], -1)
    return geometry.centroid_epilogue(o, k, "lorentz")


TRUTH_SCORE = {"cuda/lorentz_dot": "lorentz_dot", "cuda/euclidean": "euclidean", "cuda/distance": "distance",
               "sdpa": "euclidean", "(a) sdpa_lorentz_pad": "lorentz_dot", "(b) flex_rank1": "lorentz_dot",
               "(c) flex_distance": "distance", "(d) reference": "lorentz_dot", "(d) blockwise": "lorentz_dot",
               "eager_bf16": "lorentz_dot"}


def methods(small: bool, with_flex: bool):
    table = {
        "cuda/lorentz_dot": cuda_backend("lorentz_dot"),
        "cuda/euclidean": cuda_backend("euclidean"),
        "cuda/distance": cuda_backend("distance"),
        "sdpa": sdpa_euclidean,
        "(a) sdpa_lorentz_pad": sdpa_lorentz_pad,
    }
    if with_flex:
        table["(b) flex_rank1"] = flex_rank1
        table["(c) flex_distance"] = flex_distance
    if small:
        table["(d) reference"] = backend_method("reference")
        table["(d) blockwise"] = backend_method("blockwise")
    return table


def truth_of(x: Inputs, score: str) -> torch.Tensor:
    return hf.hyperbolic_attention(x.q.double(), x.k.double(), x.v.double(), score=score, causal=x.causal,
                                   backend="reference", check_inputs=False)


def rel_err(out, truth) -> float:
    return ((out.double() - truth).abs().max() / truth.abs().max()).item()


SPIN_CYCLES = 2_000_000  # ≈ 1 ms of GPU clock


def bench(fn, x: Inputs, warmup=3, reps=10, inner=5):
    """Median ms per call over ``reps`` event-timed groups of ``inner`` back-to-back calls, and the peak
    memory of one call above what was allocated before it (MiB). Each group is queued behind a GPU spin of
    about 1 ms, so the host is ahead of the GPU from the first call on (as in a model's steady state):
    the figure is GPU time, unless the host needs longer per call than the GPU, which then shows."""
    for _ in range(warmup):
        fn(x)
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        # the GPU spins while the host queues the group, so the first call's host overhead is hidden too
        torch.cuda._sleep(SPIN_CYCLES)
        start.record()
        for _ in range(inner):
            fn(x)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / inner)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(x)
    torch.cuda.synchronize()
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2**20


def env_info() -> dict:
    return {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda}


def run_config(B, H, N, D, causal, *, with_flex, with_error, small, out_rows, only=None, dtype=torch.bfloat16):
    x = make_inputs(B, H, N, D, causal=causal, dtype=dtype)
    truths = {}
    for name, fn in methods(small, with_flex).items():
        if only is not None and name not in only:
            continue
        row = dict(env_info(), method=name, B=B, H=H, N=N, D=D, causal=causal, dtype=str(dtype).replace("torch.", ""))
        try:
            ms, mem = bench(fn, x)
            row.update(ms=ms, tflops=flops(B, H, N, D, causal) / ms / 1e9, peak_mem_mib=mem)
            if with_error:
                score = TRUTH_SCORE[name]
                if score not in truths:
                    truths[score] = truth_of(x, score)
                row["rel_err"] = rel_err(fn(x), truths[score])
        except Exception as exc:  # noqa: BLE001 - a baseline that cannot run is reported, not fatal
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        print(json.dumps(row), flush=True)
        out_rows.append(row)
    del truths
    torch.cuda.empty_cache()


def accuracy_at_norm(norm, D, out_rows, N=1024, B=2, H=16):
    """Max error relative to max |output| for bf16 inputs with |x_s| = norm, per method."""
    x = make_inputs(B, H, N, D, norm=norm)
    truth = truth_of(x, "lorentz_dot")
    for name, fn in (("cuda/lorentz_dot", cuda_backend("lorentz_dot")),
                     ("cuda/lorentz_dot out_dtype=float32", backend_method("cuda", out_dtype=torch.float32)),
                     ("eager_bf16", eager_same_dtype),
                     ("(a) sdpa_lorentz_pad", sdpa_lorentz_pad), ("(b) flex_rank1", flex_rank1),
                     ("(d) reference", backend_method("reference"))):
        row = dict(env_info(), method=name, kind="accuracy", norm=norm, B=B, H=H, N=N, D=D, dtype="bfloat16")
        try:
            row["rel_err"] = rel_err(fn(x), truth)
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        print(json.dumps(row), flush=True)
        out_rows.append(row)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, D in zip(axes, (64, 128)):
        sweep = [r for r in rows if r.get("sweep") and r["D"] == D and "tflops" in r]
        for method in sorted({r["method"] for r in sweep}):
            pts = sorted((r["N"], r["tflops"]) for r in sweep if r["method"] == method)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length N")
        ax.set_ylabel("TFLOP/s (fwd, 4·B·H·N²·D)")
        ax.set_title(f"bf16 forward, B=2 H=16 D={D}, non-causal")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    gpu = rows[0]["gpu"] if rows else ""
    fig.suptitle(f"{gpu}, torch {torch.__version__}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def profile(B=2, H=16, N=4096, D=64):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    x = make_inputs(B, H, N, D)
    fn = cuda_backend("lorentz_dot")
    for _ in range(3):
        fn(x)
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            fn(x)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results.jsonl")
    parser.add_argument("--plot", default="benchmarks/attention.png")
    parser.add_argument("--sweep", default="512,1024,2048,4096,8192,16384", help="N values of the plot")
    parser.add_argument("--no-flex", action="store_true", help="skip the FlexAttention baselines")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of the cuda backend")
    parser.add_argument("--quick", action="store_true", help="main configurations only (no sweep)")
    parser.add_argument("--fp32", action="store_true",
                        help="float32 inputs: the seed's (8, 12, 1024, 64) causal shape and (2, 16, 4096, 64)")
    parser.add_argument("--fp32-only", action="store_true", help="the float32 configurations only")
    args = parser.parse_args()
    rows: list[dict] = []
    print(json.dumps(env_info()))
    if args.fp32 or args.fp32_only:
        run_config(8, 12, 1024, 64, True, with_flex=False, with_error=True, small=True, out_rows=rows, dtype=torch.float32)
        run_config(2, 16, 4096, 64, False, with_flex=False, with_error=True, small=False, out_rows=rows,
                   dtype=torch.float32)
    if args.fp32_only:
        args.quick = True
    else:
        for D in (64, 128):  # the headline configurations
            run_config(2, 16, 4096, D, False, with_flex=not args.no_flex, with_error=True, small=False, out_rows=rows)
        run_config(2, 16, 1024, 64, True, with_flex=False, with_error=True, small=True, out_rows=rows)
        accuracy_at_norm(8.0, 64, rows)
    if not args.quick:
        for D in (64, 128):
            for N in (int(n) for n in args.sweep.split(",")):
                before = len(rows)
                run_config(2, 16, N, D, False, with_flex=False, with_error=False, small=False, out_rows=rows,
                           only=("cuda/lorentz_dot", "cuda/distance", "sdpa", "(a) sdpa_lorentz_pad"))
                for r in rows[before:]:
                    r["sweep"] = True
    with open(args.out, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    if not args.quick:
        plot(rows, args.plot)
    print(f"\n{'method':24s} {'dtype':>8s} {'B':>2s} {'H':>3s} {'N':>6s} {'D':>4s} {'causal':>6s} {'ms':>8s} "
          f"{'TFLOP/s':>8s} {'MiB':>8s} {'rel_err':>9s}")
    for r in rows:
        if r.get("sweep") or r.get("kind") == "accuracy":
            continue
        print(f"{r['method']:24s} {r['dtype']:>8s} {r['B']:2d} {r['H']:3d} {r['N']:6d} {r['D']:4d} {str(r['causal']):>6s} "
              f"{r.get('ms', float('nan')):8.3f} "
              f"{r.get('tflops', float('nan')):8.1f} {r.get('peak_mem_mib', float('nan')):8.0f} "
              f"{r.get('rel_err', float('nan')):9.2e} {r.get('error', '')}")
    for r in rows:
        if r.get("kind") == "accuracy":
            print(f"accuracy |x_s|={r['norm']} D={r['D']} {r['method']:36s} rel_err {r.get('rel_err', float('nan')):.2e} "
                  f"{r.get('error', '')}")
    if args.profile:
        profile()


if __name__ == "__main__":
    main()
