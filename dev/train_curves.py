"""Diagnostics for tests/test_training_cuda.py on a GPU: loss curves of the tiny Lorentz LM with several
backends (float32), the per-step relative gaps to ``blockwise``, and the step-0 gradient gap per parameter.

    python dev/train_curves.py [--lr 3e-3] [--steps 200] [--out curves.json]
"""
import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import test_training_cuda as tt  # noqa: E402


def step0_grads(backend):
    model = tt.seeded_model(backend)
    x, y = tt.next_batch(tt.corpus(), torch.Generator().manual_seed(1))
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    loss.backward()
    return {n: p.grad.detach().double().clone() for n, p in model.named_parameters() if p.grad is not None}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--steps", type=int, default=tt.STEPS)
    ap.add_argument("--backends", nargs="+", default=["blockwise", "reference", "cuda"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    tt.STEPS = args.steps
    if args.lr is not None:
        tt.LR = args.lr
    g = {b: step0_grads(b) for b in ("blockwise", "reference", "cuda")}
    for name, ref in g["blockwise"].items():
        scale = ref.abs().max().item() + 1e-30
        gaps = {b: (g[b][name] - ref).abs().max().item() / scale for b in ("reference", "cuda")}
        print(f"step-0 grad {name:50s} rel gap ref {gaps['reference']:.2e} cuda {gaps['cuda']:.2e}")
    curves = {b: tt.loss_curve(b) for b in args.backends}
    base = curves["blockwise"]
    result = {"lr": getattr(tt, "LR", None), "curves": curves}
    for b, c in curves.items():
        rel = [abs(x - y) / abs(y) for x, y in zip(c, base)]
        result[f"gap_{b}"] = rel
        first = next((i for i, r in enumerate(rel) if r > 1e-3), None)
        print(f"{b:10s} max gap {max(rel):.2e} first step > 1e-3: {first}; gaps at 0/50/100/150/199: "
              + " ".join(f"{rel[i]:.1e}" for i in (0, 50, 100, 150, len(rel) - 1)))
    if args.out:
        Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
