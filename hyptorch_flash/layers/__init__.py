"""Hyperbolic layers: Lorentz (and Poincaré) building blocks, attention and transformers on geoopt.

Representation: every Lorentz layer takes and returns **full Lorentz points** ``(..., d + 1)`` =
(x0, xs) on H^d_k = {<x,x>_L = −k, x0 > 0} (geoopt ``Lorentz(k)``), time first; ``dim``/``embed_dim``
count the space dimensions d. Curvature arguments accept a float, a :class:`Curvature` (share one
instance to share k), or a geoopt manifold; ``learnable_curvature=True`` makes k trainable (k > 0).

Usage (a tiny hyperbolic language model)::

    import torch, geoopt, hyptorch_flash as hf
    from hyptorch_flash.layers import (Curvature, LorentzEmbedding, LorentzTransformerDecoder, LorentzMLR)

    k = Curvature(1.0, learnable=True)                    # one learnable k shared by all layers
    emb = LorentzEmbedding(vocab, 64, curvature=k)        # geoopt.ManifoldParameter table
    dec = LorentzTransformerDecoder(2, 64, 4, curvature=k, cross_attention=False)
    head = LorentzMLR(64, vocab, curvature=k)
    model = torch.nn.ModuleDict(dict(emb=emb, dec=dec, head=head))  # parameters() lists shared k once
    opt = geoopt.optim.RiemannianAdam(model.parameters(), lr=1e-3)  # keeps embeddings on the manifold

    x = emb(tokens)                                       # (B, N, 65) on H^64_k
    logits = head(dec(x))                                 # causal by default → (B, N, vocab)
    hf.set_attention_backend(dec, "blockwise")            # every attention layer in dec

    cache = dec.new_cache()                               # incremental decoding, O(N) per token
    with torch.no_grad():
        y = dec(emb(prompt), cache=cache)                 # prefill
        y = dec(emb(next_token[:, None]), cache=cache)    # one token at a time

Positions: ``LorentzPositionalEncoding(64, max_len, curvature=k)(x, offset=cache[0].length)`` before the
stack, or ``rotary=True`` (a layer keyword) for hyperbolic rotary embeddings inside attention.
Tests of your own models: :mod:`hyptorch_flash.layers.testing` (random points, manifold assertions).

Poincaré counterparts (``PoincareLinear`` after HNN++, ``PoincareMultiheadAttention`` with the
``poincare_distance`` score and gyromidpoint, ``PoincareTransformerEncoder``/``Decoder``) take ball
points ``(..., d)`` of geoopt ``PoincareBall(c=1/k)`` and the same curvature arguments.

Masks of the attention modules follow ``nn.MultiheadAttention`` (bool ``attn_mask`` True = may NOT
attend); the functional ``hyperbolic_attention`` follows SDPA (True = may attend).
"""
from .activation import LorentzActivation
from .attention import HyperbolicMultiheadAttention, PoincareMultiheadAttention
from .backend import set_attention_backend
from .cache import KVCache
from .curvature import Curvature, as_curvature, rescale
from .dropout import LorentzDropout
from .embedding import LorentzEmbedding
from .feedforward import LorentzFeedForward
from .heads import LorentzDistanceDecoder, LorentzMLR, lorentz_distance
from .linear import LorentzLinear
from .manifolds import StableLorentz
from .norm import LorentzLayerNorm
from .poincare import (
    PoincareActivation, PoincareDropout, PoincareEmbedding, PoincareFeedForward, PoincareLayerNorm, PoincareLinear,
    PoincareResidual, poincare_distance,
)
from .points import lorentz_point
from .positional import LorentzPositionalEncoding, rotary, sinusoidal_table
from .residual import LorentzResidual
from .transformer import (
    DecoderLayerCache, LorentzTransformerDecoder, LorentzTransformerDecoderLayer, LorentzTransformerEncoder,
    LorentzTransformerEncoderLayer, PoincareTransformerDecoder, PoincareTransformerDecoderLayer,
    PoincareTransformerEncoder, PoincareTransformerEncoderLayer,
)

__all__ = [
    "Curvature", "as_curvature", "rescale", "lorentz_point",
    "LorentzLinear", "LorentzLayerNorm", "LorentzActivation", "LorentzDropout", "LorentzResidual",
    "LorentzEmbedding", "LorentzFeedForward", "LorentzMLR", "LorentzDistanceDecoder", "lorentz_distance",
    "HyperbolicMultiheadAttention", "KVCache", "DecoderLayerCache",
    "LorentzTransformerEncoderLayer", "LorentzTransformerDecoderLayer",
    "LorentzTransformerEncoder", "LorentzTransformerDecoder", "set_attention_backend", "StableLorentz",
    "PoincareLinear", "PoincareLayerNorm", "PoincareActivation", "PoincareDropout", "PoincareResidual",
    "PoincareFeedForward", "PoincareEmbedding", "poincare_distance", "PoincareMultiheadAttention",
    "PoincareTransformerEncoderLayer", "PoincareTransformerDecoderLayer", "PoincareTransformerEncoder",
    "PoincareTransformerDecoder", "LorentzPositionalEncoding", "rotary", "sinusoidal_table",
]
