"""Functional ops and the attention backends behind them."""
from . import cuda_backend
from .attention import hyperbolic_attention, hyperbolic_attention_weights
from .backends import Backend, attention_backend, backend_names, register_backend, requested_backend
from .blockwise import blockwise_attention
from .linear_attention import LinearAttentionState, linear_attention_with_state
from .reference import reference_attention

register_backend(Backend("reference", reference_attention, lambda problem: None,
                         "eager math materialising the N×M scores; the oracle"))


def _blockwise_unsupported(problem):
    mask = problem.mask.attn_mask
    if mask is not None and problem.variant.name == "linear":
        return ("a dense attn_mask with score='linear' (its O(N) form takes causal and key_padding_mask; "
                "the reference backend applies dense masks)")
    if mask is not None and mask.requires_grad:
        return "a float attn_mask that requires grad (the blockwise backward gives no mask gradient)"
    return None


def _cuda_unsupported(problem):
    if problem.variant.name not in cuda_backend.SCORE_IDS:
        return (f"score={problem.variant.name!r} has no fused CUDA kernel "
                "(the blockwise backend runs its O(N) form on any device)")
    return cuda_backend.unsupported(problem)


register_backend(Backend("blockwise", blockwise_attention, _blockwise_unsupported,
                         "pure-PyTorch FlashAttention-2 with a recomputing backward; O(N) memory"))
register_backend(Backend("cuda", cuda_backend.run, _cuda_unsupported, "fused CUDA kernels"))

__all__ = [
    "hyperbolic_attention", "hyperbolic_attention_weights", "attention_backend", "backend_names",
    "register_backend", "requested_backend", "Backend", "blockwise_attention", "reference_attention",
    "LinearAttentionState", "linear_attention_with_state",
]
