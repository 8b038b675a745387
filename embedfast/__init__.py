"""embedfast: a fused Transformer input embedding (token * scale + position + segment) for PyTorch."""

from . import ops as _ops  # noqa: F401  (registers the operators)
from .backends import CpuInfo, available_backends, cpu_info
from .drop_in import PatchReport, from_modules, patch_model
from .functional import fused_input_embedding
from .module import FusedInputEmbedding
from .positions import sinusoidal_positions

__all__ = [
    "CpuInfo", "FusedInputEmbedding", "PatchReport", "available_backends", "cpu_info", "from_modules",
    "fused_input_embedding", "patch_model", "sinusoidal_positions",
]
__version__ = "0.1.0"
