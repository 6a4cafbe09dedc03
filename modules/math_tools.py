"""Arithmetic and descriptive statistics: typed arguments, validated by the gateway."""

import math
import statistics
from typing import Annotated

from msgspec import Meta

# A float far enough from float's limit (1.8e308) that sums, means and spreads of these stay
# finite: JSON has no infinity, so an infinite result could not be answered as a number.
Real = Annotated[float, Meta(ge=-1e300, le=1e300)]

__all_exposed__ = [
    {"name": "add", "inline": True},  # tiny and pure: runs on the event loop, no thread hop
    "power",
    "describe",
    {"name": "is_prime", "timeout": 2.0},  # its own deadline instead of the global 30 s
]


def add(a: Real, b: Real) -> float:
    """Add two numbers."""
    return a + b


def power(
    base: Annotated[float, Meta(ge=-1e6, le=1e6)], exponent: Annotated[int, Meta(ge=0, le=50)] = 2
) -> float:
    """Raise `base` to `exponent`; `POST /rest/power/3` squares 3.

    The bounds keep the result finite (at most 1e300) and rule out 0 to a negative power.
    """
    return base**exponent


def describe(values: Annotated[list[Real], Meta(min_length=1)]) -> dict[str, float]:
    """Mean, median, standard deviation, minimum and maximum of a list of numbers."""
    return {
        "count": len(values),
        "mean": statistics.fmean(values),
        "median": statistics.median(values),
        "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def is_prime(n: Annotated[int, Meta(ge=0, le=10**12)]) -> bool:
    """Trial division; the type hint's bounds keep `n` small enough to answer quickly."""
    if n < 2:
        return False
    return all(n % d for d in range(2, math.isqrt(n) + 1))
