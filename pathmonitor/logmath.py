"""Arithmetic on natural logarithms of non-negative numbers, for quantities beyond float64."""
from __future__ import annotations

import math

_LOG_FLOAT64_MAX = 709.782712893384  # log(1.7976931348623157e308)


def exp_or_inf(log_value: float) -> float:
    """exp(log_value), inf when it exceeds float64."""
    return math.exp(log_value) if log_value <= _LOG_FLOAT64_MAX else math.inf


def exceeds_float64(log_value: float) -> bool:
    return log_value > _LOG_FLOAT64_MAX


def log_difference(log_big: float, log_small: float) -> float:
    """log(exp(log_big) - exp(log_small)) for log_big >= log_small (-inf when they are equal)."""
    if log_small == -math.inf:
        return log_big
    gap = log_small - log_big
    if gap >= 0:
        return -math.inf
    return log_big + math.log(-math.expm1(gap))


def log_sum(first: float, second: float) -> float:
    """log(exp(first) + exp(second))."""
    high, low = max(first, second), min(first, second)
    return high if low == -math.inf else high + math.log1p(math.exp(low - high))
