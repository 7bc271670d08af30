"""pathmonitor: path-norms and path-metrics of ReLU networks, live in training (see docs/MATH.md)."""
from .bounds import GeneralizationBound, generalization_bound
from .errors import (IgnoredHookWarning, ParameterMismatchError, PathComputationError, SupportReport,
                     UnsupportedModelError, UnsupportedNode)
from .metrics import PathMetric, function_distance_bound, path_metric, quantization_bound
from .norms import PathNormOverflowWarning, check_support, log_path_norm, path_norm
from .penalty import path_norm_penalty
from .pruning import Certified
from .rescale import random_rescale
from .scores import path_magnitude_scores

__all__ = [
    "Certified",
    "GeneralizationBound",
    "IgnoredHookWarning",
    "ParameterMismatchError",
    "PathComputationError",
    "PathMetric",
    "PathNormOverflowWarning",
    "SupportReport",
    "UnsupportedModelError",
    "UnsupportedNode",
    "check_support",
    "function_distance_bound",
    "generalization_bound",
    "log_path_norm",
    "path_magnitude_scores",
    "path_metric",
    "path_norm",
    "path_norm_penalty",
    "quantization_bound",
    "random_rescale",
]
__version__ = "0.1.0"
