"""hyptorch_flash: fused, memory-frugal hyperbolic attention for PyTorch."""
from . import geometry, numerics
from .ops import attention_backend, backend_names, hyperbolic_attention, hyperbolic_attention_weights
from . import layers
from .layers import set_attention_backend

__version__ = "0.1.0"

__all__ = [
    "geometry", "numerics", "hyperbolic_attention", "hyperbolic_attention_weights",
    "attention_backend", "backend_names", "layers", "set_attention_backend",
]
