"""pathmonitor: path-norms and path-metrics of ReLU networks, live in training (see MATH.md)."""
from .errors import PathComputationError, SupportReport, UnsupportedModelError, UnsupportedNode
from .norms import PathNormOverflowWarning, check_support, log_path_norm, path_norm

__all__ = [
    "PathComputationError",
    "PathNormOverflowWarning",
    "SupportReport",
    "UnsupportedModelError",
    "UnsupportedNode",
    "check_support",
    "log_path_norm",
    "path_norm",
]
__version__ = "0.1.0"
