"""WordNet mammal hierarchy: Lorentz node embeddings + a Lorentz transformer encoder, vs a Euclidean twin.

    python examples/train_graph.py                        # tiny CPU config (dim 10), a few minutes on 2 cores
    python examples/train_graph.py --model=euclidean      # same-size Euclidean model, same data and loss
    python examples/train_graph.py --config=gpu           # bigger GPU config
    torchrun --nproc_per_node=2 examples/train_graph.py   # data-parallel (gloo on CPU, NCCL on GPU)
    python examples/train_graph.py --resume               # continue from <out_dir>/ckpt.pt exactly

Every key of CONFIG below can be overridden with ``--key=value`` (``--attn-backend`` and
``--attn_backend`` are the same key).

Data: ``examples/data/mammal_closure.tsv``, the transitive closure of WordNet 3.0's noun hierarchy under
mammal.n.01 (built offline by ``examples/data/build_wordnet_mammals.py``; WordNet licence next to it).

Model (hyperbolic): every node is a point of H^dim_k (``LorentzEmbedding``, a geoopt ManifoldParameter);
a small pre-norm Lorentz transformer encoder attends across *all* nodes at once (one sequence of
1,180 points), with each node's depth in the hierarchy as structural information (a learned Lorentz
depth embedding merged in by an LResNet residual); a distance decoder scores a pair by
(r − d(u, v)²)/t (``LorentzDistanceDecoder``). The Euclidean twin has the same sizes with R^dim points.

Loss (Nickel & Kiela 2017, "Poincaré Embeddings for Learning Hierarchical Representations", eq. 6):
for each closure pair (u, v), softmax cross-entropy of v against ``neg_samples`` random nodes that are
not neighbours of u. Optimiser: geoopt RiemannianAdam. Metrics (same paper, "reconstruction"): for
every pair (u, v), the rank of d(u, v) among the distances from u to all its non-neighbours, averaged
(mean rank, 1 = perfect), and the mean over nodes u of the average precision of u's neighbours (MAP).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from hyptorch_flash.layers import (Curvature, LorentzDistanceDecoder, LorentzEmbedding, LorentzResidual,
                                   LorentzTransformerEncoder, lorentz_distance)

# -----------------------------------------------------------------------------------------------
# Config. The defaults are the tiny CPU run; --config=gpu applies the GPU preset first.
CONFIG = dict(
    config="tiny",  # preset: tiny | gpu
    model="lorentz",  # lorentz | euclidean
    out_dir="",  # default: examples/out/graph_<model>
    data="",  # default: examples/data/mammal_closure.tsv
    # model
    dim=10,  # intrinsic dimension (Lorentz points live in R^{dim+1})
    n_layer=1,  # encoder layers over the nodes (0 = embeddings only)
    n_head=2,
    mlp_ratio=2,
    dropout=0.0,
    curvature=1.0,  # k of H^dim_k (sectional curvature -1/k)
    init_std=1e-3,
    # optimisation
    batch_size=512,  # global batch of (u, v) pairs, split across torchrun processes
    neg_samples=50,
    max_iters=1500,
    lr=3e-2,
    min_lr=3e-3,
    warmup_iters=100,  # Nickel & Kiela's "burn-in": small steps while the points leave the origin
    lr_decay_iters=0,  # cosine decay length; 0 = max_iters
    grad_clip=0.0,
    # eval / logging / checkpoints
    eval_interval=250,
    ckpt_interval=0,  # 0 = only at eval points and at the end
    resume=False,
    # runtime
    attn_backend="auto",  # reference | blockwise | cuda | auto
    device="auto",  # auto | cpu | cuda | cuda:N
    dtype="fp32",  # fp32 | bf16 (autocast)
    seed=0,
    threads=0,  # torch.set_num_threads; 0 = leave torch's default
)
PRESETS = {
    "tiny": {},
    "gpu": dict(n_layer=2, n_head=2, mlp_ratio=4, batch_size=2048, neg_samples=100, max_iters=5000,
                eval_interval=500, device="cuda"),
}
CHOICES = {
    "config": tuple(PRESETS),
    "model": ("lorentz", "euclidean"),
    "attn_backend": ("reference", "blockwise", "cuda", "auto"),
    "dtype": ("fp32", "bf16"),
}
NAME = "graph"


def parse_config(argv: list[str]) -> dict:
    """CONFIG, then the preset named by --config, then every --key=value (types follow CONFIG)."""
    overrides = {}
    for arg in argv:
        if not arg.startswith("--"):
            raise SystemExit(f"error: unexpected argument {arg!r}; use --key=value (keys: {', '.join(CONFIG)})")
        key, has_value, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key not in CONFIG:
            raise SystemExit(f"error: unknown option --{key}; valid options: {', '.join('--' + k for k in CONFIG)}")
        if not has_value:
            if not isinstance(CONFIG[key], bool):
                raise SystemExit(f"error: --{key} needs a value (--{key}=...)")
            value = "true"
        overrides[key] = value
    preset = overrides.get("config", CONFIG["config"])
    if preset not in PRESETS:
        raise SystemExit(f"error: --config={preset!r} is not one of {', '.join(PRESETS)}")
    cfg = {**CONFIG, **PRESETS[preset]}
    for key, value in overrides.items():
        cfg[key] = _convert(key, value, CONFIG[key])
    for key, allowed in CHOICES.items():
        if cfg[key] not in allowed:
            raise SystemExit(f"error: --{key}={cfg[key]!r} is not one of {', '.join(allowed)}")
    for key in ("dim", "n_head", "batch_size", "neg_samples", "max_iters", "eval_interval"):
        if cfg[key] <= 0:
            raise SystemExit(f"error: --{key} must be positive, got {cfg[key]}")
    if cfg["n_layer"] < 0:
        raise SystemExit(f"error: --n_layer must be ≥ 0, got {cfg['n_layer']}")
    if cfg["n_layer"] and cfg["dim"] % cfg["n_head"]:
        raise SystemExit(f"error: --dim={cfg['dim']} must be divisible by --n_head={cfg['n_head']}")
    if cfg["curvature"] <= 0:
        raise SystemExit(f"error: --curvature must be > 0 (k of H^dim_k), got {cfg['curvature']}")
    here = os.path.dirname(os.path.abspath(__file__))
    cfg["lr_decay_iters"] = cfg["lr_decay_iters"] or cfg["max_iters"]
    cfg["out_dir"] = cfg["out_dir"] or os.path.join(here, "out", f"{NAME}_{cfg['model']}")
    cfg["data"] = cfg["data"] or os.path.join(here, "data", "mammal_closure.tsv")
    return cfg


def _convert(key: str, value: str, default):
    try:
        if isinstance(default, bool):
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError
            return value.lower() in ("1", "true", "yes")
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        return value
    except ValueError:
        raise SystemExit(f"error: --{key}={value!r} is not a valid {type(default).__name__}") from None


# -----------------------------------------------------------------------------------------------
# Data: closure pairs, symmetric adjacency, node depths.
class Closure:
    """The mammal closure as tensors.

    ``names``: node names (sorted); ``pairs``: ``(P, 2)`` int64 (child, ancestor) and (ancestor, child),
    both directions, since reconstruction ranks neighbours of every node; ``adjacency``: ``(N, N)`` bool,
    symmetric, no self-loops; ``depth``: ``(N,)`` int64, the number of ancestors of each node.
    """

    def __init__(self, path: str):
        if not os.path.exists(path):
            raise SystemExit(f"error: no graph data at {path}; the repository ships examples/data/mammal_closure.tsv "
                             "(rebuild it with examples/data/build_wordnet_mammals.py)")
        edges = []
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if line.startswith("#") or not line.strip():
                    continue
                parts = line.rstrip("\n").split("\t")
                if len(parts) != 2:
                    raise SystemExit(f"error: {path}:{line_no}: expected 'child<TAB>ancestor', got {line.strip()!r}")
                edges.append(parts)
        self.names = sorted({name for edge in edges for name in edge})
        index = {name: i for i, name in enumerate(self.names)}
        directed = torch.tensor([[index[c], index[a]] for c, a in edges], dtype=torch.long)  # (E, 2)
        n = len(self.names)
        self.num_edges = len(directed)
        self.adjacency = torch.zeros(n, n, dtype=torch.bool)
        self.adjacency[directed[:, 0], directed[:, 1]] = True
        self.adjacency |= self.adjacency.T.clone()
        self.adjacency.fill_diagonal_(False)
        self.pairs = torch.cat([directed, directed.flip(1)])  # (2E, 2)
        self.depth = torch.bincount(directed[:, 0], minlength=n)  # ancestors per node


def get_batch(closure: Closure, step: int, cfg: dict, rank: int, world: int, salt: int = 0):
    """This process's share of global batch ``step``: (u ``(b,)``, candidates ``(b, 1 + neg)``, valid ``(b, 1 + neg)``).

    Pairs come from per-epoch permutations and negatives from a generator seeded by the step, so the
    global batch is a pure function of (seed, step): resumed and multi-process runs see the same data.
    Column 0 of ``candidates`` is the true neighbour v; a negative that is u or a neighbour of u is
    marked invalid (Nickel & Kiela sample negatives among non-neighbours).
    """
    num_pairs, bs = len(closure.pairs), cfg["batch_size"]
    positions = torch.arange(step * bs, (step + 1) * bs)
    epochs, offsets = positions // num_pairs, positions % num_pairs
    order = torch.empty(bs, dtype=torch.long)
    for epoch in epochs.unique().tolist():
        perm = torch.randperm(num_pairs, generator=torch.Generator().manual_seed(cfg["seed"] * 100_003 + epoch))
        order[epochs == epoch] = perm[offsets[epochs == epoch]]
    g = torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + salt * 7_919 + step)
    negatives = torch.randint(len(closure.names), (bs, cfg["neg_samples"]), generator=g)
    pairs = closure.pairs[order]
    u, candidates = pairs[:, 0], torch.cat([pairs[:, 1:], negatives], 1)
    valid = ~closure.adjacency[u[:, None], candidates] & (candidates != u[:, None])
    valid[:, 0] = True
    return u.chunk(world)[rank], candidates.chunk(world)[rank], valid.chunk(world)[rank]


# -----------------------------------------------------------------------------------------------
# Models: both expose encode() -> all node representations, and score(z_u, z_v) -> logits.
class EuclideanEncoderLayer(nn.Module):
    """Pre-norm transformer encoder layer (no final norm: the norm of a point carries its depth)."""

    def __init__(self, d: int, n_head: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, n_head, dropout=dropout, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, mlp_ratio * d), nn.GELU(), nn.Linear(mlp_ratio * d, d), nn.Dropout(dropout))

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class EuclideanGraphModel(nn.Module):
    """Node embeddings in R^dim + depth embedding + transformer encoder; logits (r − |z_u − z_v|²)/t."""

    def __init__(self, cfg: dict, closure: Closure):
        super().__init__()
        n, d = len(closure.names), cfg["dim"]
        self.register_buffer("depth", closure.depth.clone())
        self.nodes = nn.Embedding(n, d)
        nn.init.normal_(self.nodes.weight, std=cfg["init_std"])
        self.depth_emb = nn.Embedding(int(closure.depth.max()) + 1, d) if cfg["n_layer"] else None
        if self.depth_emb is not None:
            nn.init.normal_(self.depth_emb.weight, std=cfg["init_std"])
        self.layers = nn.ModuleList(EuclideanEncoderLayer(d, cfg["n_head"], cfg["mlp_ratio"], cfg["dropout"])
                                    for _ in range(cfg["n_layer"]))
        self.log_t = nn.Parameter(torch.zeros(()))

    def encode(self):
        x = self.nodes.weight
        if self.depth_emb is not None:
            x = x + self.depth_emb(self.depth)
        x = x[None]  # (1, N, dim): one sequence of all nodes
        for layer in self.layers:
            x = layer(x)
        return x[0]

    def distance(self, zu, zv):
        return (zu - zv).pow(2).sum(-1).clamp_min(1e-12).sqrt()

    def score(self, zu, zv):
        return -self.distance(zu, zv).pow(2) / self.log_t.exp()  # the decoder's r cancels in the softmax

    def forward(self, u, candidates):
        z = self.encode()
        return self.score(z[u][:, None], z[candidates])  # (b, 1 + neg)


class LorentzGraphModel(nn.Module):
    """Nodes on H^dim_k + Lorentz depth embedding (LResNet merge) + Lorentz encoder + distance decoder.

    No final norm in the encoder: a LayerNorm would erase the distance from the origin, which is
    where a hyperbolic embedding stores a node's generality (Nickel & Kiela 2017, §3).
    """

    def __init__(self, cfg: dict, closure: Closure):
        super().__init__()
        n, d = len(closure.names), cfg["dim"]
        self.k = Curvature(cfg["curvature"])
        self.register_buffer("depth", closure.depth.clone())
        self.register_buffer("node_ids", torch.arange(n))
        self.nodes = LorentzEmbedding(n, d, curvature=self.k, init_std=cfg["init_std"])
        if cfg["n_layer"]:
            self.depth_emb = LorentzEmbedding(int(closure.depth.max()) + 1, d, curvature=self.k,
                                              init_std=cfg["init_std"])
            self.merge = LorentzResidual(d, curvature=self.k, check_inputs=False)
            self.encoder = LorentzTransformerEncoder(cfg["n_layer"], d, cfg["n_head"], cfg["mlp_ratio"] * d,
                                                     curvature=self.k, dropout=cfg["dropout"], final_norm=False,
                                                     check_inputs=False)
        else:
            self.depth_emb = self.merge = self.encoder = None
        self.decoder = LorentzDistanceDecoder(d, curvature=self.k, learnable=True, check_inputs=False)

    def encode(self):
        x = self.nodes(self.node_ids)  # (N, dim + 1) on H_k
        if self.encoder is not None:
            x = self.merge(x, self.depth_emb(self.depth))
            x = self.encoder(x[None])[0]  # one sequence of all nodes: (1, N, dim + 1)
        return x

    def distance(self, zu, zv):
        return lorentz_distance(zu, zv, self.k())

    def score(self, zu, zv):
        return self.decoder(zu, zv)  # (r − d²)/t; r cancels in the softmax of the loss

    def forward(self, u, candidates):
        z = self.encode()
        return self.score(z[u][:, None], z[candidates])  # (b, 1 + neg)


def build_lorentz_model(cfg: dict, closure: Closure) -> nn.Module:
    return LorentzGraphModel(cfg, closure)


def build_model(cfg: dict, closure: Closure) -> nn.Module:
    return EuclideanGraphModel(cfg, closure) if cfg["model"] == "euclidean" else build_lorentz_model(cfg, closure)


# -----------------------------------------------------------------------------------------------
# Reconstruction metrics (Nickel & Kiela 2017).
@torch.no_grad()
def reconstruction_metrics(dist_matrix: torch.Tensor, adjacency: torch.Tensor) -> dict:
    """Mean rank and MAP from an ``(N, N)`` distance matrix and the symmetric ``(N, N)`` adjacency.

    For node u and neighbour v: rank = 1 + #{non-neighbours w ≠ u with d(u, w) < d(u, v)}.
    AP(u) = mean over neighbours v of precision at v's position in u's distance ordering (all w ≠ u).
    """
    n = dist_matrix.shape[0]
    d = dist_matrix.double().clone()
    d.fill_diagonal_(float("inf"))  # u itself is neither neighbour nor candidate
    order = d.argsort(dim=1, stable=True)
    positive = adjacency.gather(1, order)[:, : n - 1].double()  # (N, N-1) in distance order
    before = positive.cumsum(1) - positive  # neighbours ranked before each position
    position = torch.arange(n - 1, dtype=torch.float64)
    ranks = (position - before + 1)[positive.bool()]  # 1 + non-neighbours ranked before
    precision = (before + 1) / (position + 1)
    has = positive.sum(1) > 0
    ap = (precision * positive).sum(1)[has] / positive.sum(1)[has]
    return {"mean_rank": ranks.mean().item(), "map": ap.mean().item()}


@torch.no_grad()
def evaluate(model, closure, cfg, device) -> dict:
    """Reconstruction metrics on all N×N pairs and the loss on a fixed batch of pairs and negatives."""
    model.eval()
    z = model.encode()
    chunks = [model.distance(z[i:i + 256][:, None], z[None]).float().cpu() for i in range(0, len(z), 256)]
    metrics = reconstruction_metrics(torch.cat(chunks), closure.adjacency)
    u, candidates, valid = (t.to(device) for t in get_batch(closure, 0, cfg, 0, 1, salt=1))
    metrics["loss"] = nce_loss(model.score(z[u][:, None], z[candidates]), valid).item()
    model.train()
    return metrics


def nce_loss(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of column 0 (the true neighbour) against the valid negatives; ``(b, 1+neg)`` → scalar."""
    logits = logits.float().masked_fill(~valid, -float("inf"))
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


# -----------------------------------------------------------------------------------------------
# Runtime: devices, processes, schedules, checkpoints, plots.
def setup_runtime(cfg: dict):
    """(device, rank, world_size); starts the process group under torchrun (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    want = cfg["device"]
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit(f"error: --device={cfg['device']} but no CUDA device is available (use --device=cpu)")
        device = torch.device(f"cuda:{local_rank}" if world > 1 else want)
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    elif want == "cpu":
        device = torch.device("cpu")
    else:
        raise SystemExit(f"error: --device={want!r}: use auto, cpu, cuda or cuda:N")
    if cfg["attn_backend"] == "cuda" and device.type != "cuda":
        raise SystemExit("error: --attn_backend=cuda needs --device=cuda (on CPU use blockwise, reference or auto)")
    if cfg["batch_size"] % world:
        raise SystemExit(f"error: --batch_size={cfg['batch_size']} must be divisible by the {world} processes")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    return device, rank, world


def autocast(cfg: dict, device: torch.device):
    if cfg["dtype"] == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def learning_rate(step: int, cfg: dict) -> float:
    """Linear warm-up, then cosine decay to min_lr over lr_decay_iters (nanoGPT's schedule)."""
    if step < cfg["warmup_iters"]:
        return cfg["lr"] * (step + 1) / cfg["warmup_iters"]
    if step >= cfg["lr_decay_iters"]:
        return cfg["min_lr"]
    ratio = (step - cfg["warmup_iters"]) / max(1, cfg["lr_decay_iters"] - cfg["warmup_iters"])
    return cfg["min_lr"] + 0.5 * (1 + math.cos(math.pi * ratio)) * (cfg["lr"] - cfg["min_lr"])


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(path, model, optimizer, step, history, cfg, device, rank, world) -> None:
    """Rank 0 writes model, optimizer, step (= data position), metrics so far and every rank's RNG state."""
    states = [None] * world
    if world > 1:
        dist.all_gather_object(states, rng_state(device))
    else:
        states = [rng_state(device)]
    if rank == 0:
        tmp = path + ".tmp"
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                    "history": history, "config": cfg, "rng": states, "world_size": world}, tmp)
        os.replace(tmp, path)  # never leave a half-written checkpoint behind


def load_checkpoint(path, model, optimizer, cfg, device, rank, world):
    if not os.path.exists(path):
        raise SystemExit(f"error: --resume but no checkpoint at {path}")
    ckpt = torch.load(path, map_location=device, weights_only=False)
    for key in ("model", "dim", "n_layer", "n_head", "mlp_ratio"):
        if ckpt["config"][key] != cfg[key]:
            raise SystemExit(f"error: checkpoint has {key}={ckpt['config'][key]!r}, this run {cfg[key]!r}")
    if ckpt["world_size"] != world:
        raise SystemExit(f"error: checkpoint was written by {ckpt['world_size']} processes, this run has {world}")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    for state in optimizer.state.values():
        # torch's load_state_dict turns geoopt's int step count into a float32 tensor, which changes
        # RiemannianAdam's bias correction (beta**step) in the last bits: restore the int.
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = int(state["step"].item())
    set_rng_state(ckpt["rng"][rank], device)
    return ckpt["step"], ckpt["history"]


def save_plot(history: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_map) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax_loss.plot([r["step"] for r in history["train"]], [r["loss"] for r in history["train"]], lw=0.8, label="train")
    evals = history["val"]
    if evals:
        steps = [r["step"] for r in evals]
        ax_loss.plot(steps, [r["loss"] for r in evals], "o-", label="eval (fixed negatives)")
        ax_map.plot(steps, [r["map"] for r in evals], "o-", color="C2", label="MAP")
        ax_rank = ax_map.twinx()
        ax_rank.plot(steps, [r["mean_rank"] for r in evals], "s--", color="C3", label="mean rank")
        ax_rank.set_ylabel("mean rank")
        ax_rank.set_yscale("log")
    ax_loss.set(xlabel="step", ylabel="loss", title=title)
    ax_map.set(xlabel="step", ylabel="MAP", title="reconstruction")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(loc="upper right")
    ax_map.grid(alpha=0.3)
    handles = [h for ax in fig.axes[1:] for h in ax.get_legend_handles_labels()[0]]
    ax_map.legend(handles, [h.get_label() for h in handles], loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def all_reduce_mean(value: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        dist.all_reduce(value)
        value = value / world
    return value


# -----------------------------------------------------------------------------------------------
# Training.
def main(argv: list[str]) -> dict:
    cfg = parse_config(argv)
    device, rank, world = setup_runtime(cfg)
    master = rank == 0
    torch.manual_seed(cfg["seed"])
    random.seed(cfg["seed"])
    closure = Closure(cfg["data"])

    import geoopt
    import hyptorch_flash

    model = build_model(cfg, closure).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = geoopt.optim.RiemannianAdam(model.parameters(), lr=cfg["lr"])
    os.makedirs(cfg["out_dir"], exist_ok=True)
    ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")
    step, history = 0, {"train": [], "val": []}
    if cfg["resume"]:
        step, history = load_checkpoint(ckpt_path, model, optimizer, cfg, device, rank, world)
    ddp_model = model
    if world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if master:
        print(f"{cfg['model']} graph model: {n_params:,} parameters; {len(closure.names):,} nodes, "
              f"{closure.num_edges:,} closure edges; dim {cfg['dim']}, {cfg['n_layer']} encoder layer(s); "
              f"device {device}, {world} process(es), dtype {cfg['dtype']}, attention backend {cfg['attn_backend']}",
              flush=True)

    from tqdm import tqdm

    bar = tqdm(total=cfg["max_iters"], initial=step, disable=not master, dynamic_ncols=True, desc=cfg["model"],
               mininterval=0.5)
    started = time.time()
    with hyptorch_flash.attention_backend(cfg["attn_backend"]):
        while step < cfg["max_iters"]:
            lr = learning_rate(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            u, candidates, valid = (t.to(device) for t in get_batch(closure, step, cfg, rank, world))
            with autocast(cfg, device):
                logits = ddp_model(u, candidates)
            loss = nce_loss(logits, valid)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg["grad_clip"]:
                nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
            optimizer.step()
            step += 1
            global_loss = all_reduce_mean(loss.detach(), world).item()
            if not math.isfinite(global_loss):
                raise SystemExit(f"error: loss became {global_loss} at step {step} (try a lower --lr, or "
                                 f"--dtype=fp32 if this is a bf16 run)")
            history["train"].append({"step": step, "loss": global_loss, "lr": lr})
            bar.update(1)
            bar.set_postfix(loss=f"{global_loss:.4f}")
            at_eval = step % cfg["eval_interval"] == 0 or step == cfg["max_iters"]
            if at_eval:
                # Every process holds the full model; the metrics are computed redundantly (cheap, no comms).
                with autocast(cfg, device):
                    metrics = evaluate(model, closure, cfg, device)
                history["val"].append({"step": step, **metrics})
                if master:
                    bar.write(f"step {step}: train loss {global_loss:.4f}, eval loss {metrics['loss']:.4f}, "
                              f"mean rank {metrics['mean_rank']:.2f}, MAP {metrics['map']:.4f}")
            if at_eval or (cfg["ckpt_interval"] and step % cfg["ckpt_interval"] == 0):
                save_checkpoint(ckpt_path, model, optimizer, step, history, cfg, device, rank, world)
    bar.close()
    result = {"config": cfg, "parameters": n_params, "world_size": world, "nodes": len(closure.names),
              "edges": closure.num_edges, "train_seconds_this_run": time.time() - started, **history}
    if history["val"]:
        last = history["val"][-1]
        result["final"] = {"step": last["step"], "mean_rank": last["mean_rank"], "map": last["map"], "loss": last["loss"]}
    if master:
        with open(os.path.join(cfg["out_dir"], "metrics.json"), "w") as f:
            json.dump(result, f, indent=1)
        plot = os.path.join(cfg["out_dir"], "curves.png")
        save_plot(history, plot, f"WordNet mammals, {cfg['model']} dim {cfg['dim']} ({n_params:,} params)")
        if "final" in result:
            print(f"final reconstruction: mean rank {result['final']['mean_rank']:.2f}, MAP {result['final']['map']:.4f}; "
                  f"plot: {plot}; metrics: {os.path.join(cfg['out_dir'], 'metrics.json')}", flush=True)
    if world > 1:
        # every rank waits for the master's sampling/plotting, then all tear gloo/NCCL down together (a rank
        # that exits while its peer still holds the connections can abort in gloo's teardown)
        dist.barrier()
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
