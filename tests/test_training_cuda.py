"""Training through the fused kernels (issue #5's training check; skipped without CUDA).

A small Lorentz transformer language model (library layers only, geoopt's RiemannianAdam) is trained
200 steps in float32 from one seed on the same batches, once with the ``cuda`` backend (split-precision
forward and backward kernels) and once with ``blockwise`` (eager PyTorch): the two loss curves agree
within 1e-3 relative at every step, and the model learns.
"""
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

geoopt = pytest.importorskip("geoopt")

from hyptorch_flash import set_attention_backend  # noqa: E402
from hyptorch_flash.layers import (  # noqa: E402
    Curvature, LorentzEmbedding, LorentzMLR, LorentzResidual, LorentzTransformerDecoder,
)

pytestmark = pytest.mark.cuda
DEV = "cuda"
# At lr = 3e-3 this run is chaotic: on an H100 even the two eager backends (reference, blockwise) part by
# more than 1e-3 after about 120 steps (dev/train_curves.py --lr 3e-3). At 1e-3 they agree to ~5e-6.
STEPS, BATCH, BLOCK, LR = 200, 8, 128, 1e-3
# A file that does not change with the docs (the WordNet mammal closure the graph example trains on).
CORPUS = Path(__file__).resolve().parent.parent / "examples" / "data" / "mammal_closure.tsv"


class TinyLorentzLM(nn.Module):
    """Bytes → Lorentz token + position embeddings (merged by an LResNet residual) → causal Lorentz
    decoder (2 layers, 2 heads of dim 64) → LorentzMLR logits ``(B, N, 256)``."""

    def __init__(self, dim: int = 128, heads: int = 2, layers: int = 2):
        super().__init__()
        self.k = Curvature(1.0, learnable=True)
        self.tok = LorentzEmbedding(256, dim, curvature=self.k, init_std=0.1)
        self.pos = LorentzEmbedding(BLOCK, dim, curvature=self.k, init_std=0.1)
        self.merge = LorentzResidual(dim, curvature=self.k, check_inputs=False)
        self.decoder = LorentzTransformerDecoder(layers, dim, heads, 2 * dim, curvature=self.k,
                                                 cross_attention=False, check_inputs=False)
        self.head = LorentzMLR(dim, 256, curvature=self.k, check_inputs=False)

    def forward(self, idx):
        tok = self.tok(idx)
        x = self.merge(tok, self.pos(torch.arange(idx.shape[1], device=idx.device)).expand_as(tok))
        return self.head(self.decoder(x))


def corpus() -> torch.Tensor:
    return torch.tensor(list(CORPUS.read_bytes()), dtype=torch.long)


def next_batch(data: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BATCH random windows of BLOCK bytes and their next bytes, on DEV."""
    starts = torch.randint(0, len(data) - BLOCK - 1, (BATCH,), generator=gen)
    x = torch.stack([data[s : s + BLOCK] for s in starts]).to(DEV)
    y = torch.stack([data[s + 1 : s + BLOCK + 1] for s in starts]).to(DEV)
    return x, y


def seeded_model(backend: str) -> TinyLorentzLM:
    torch.manual_seed(0)
    return set_attention_backend(TinyLorentzLM().to(DEV), backend)


def loss_curve(backend: str) -> list[float]:
    data = corpus()
    model = seeded_model(backend)
    optimizer = geoopt.optim.RiemannianAdam(model.parameters(), lr=LR)
    batches = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(STEPS):
        x, y = next_batch(data, batches)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_float32_training_curves_of_cuda_and_blockwise_agree():
    cuda, blockwise = loss_curve("cuda"), loss_curve("blockwise")
    rel = [abs(a - b) / abs(b) for a, b in zip(cuda, blockwise)]
    worst = max(range(STEPS), key=rel.__getitem__)
    print(f"max relative loss gap {rel[worst]:.2e} at step {worst}; loss {blockwise[0]:.4f} -> {blockwise[-1]:.4f}")
    assert rel[worst] <= 1e-3, f"step {worst}: cuda {cuda[worst]:.6f} vs blockwise {blockwise[worst]:.6f}"
    assert blockwise[-1] < 0.6 * blockwise[0], "the model did not learn; the comparison would be vacuous"
