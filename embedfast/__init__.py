"""embedfast: a fused Transformer input embedding (token * scale + position + segment) for PyTorch."""

from . import ops as _ops  # noqa: F401  (registers the operators)
from .backends import available_backends
from .functional import fused_input_embedding
from .module import FusedInputEmbedding
from .positions import sinusoidal_positions

__all__ = ["FusedInputEmbedding", "available_backends", "fused_input_embedding", "sinusoidal_positions"]
__version__ = "0.1.0"
