"""Repeated, interleaved timings and the claims they allow.

Step costs drift between runs of the same script (clocks, memory placement, other tenants), by
more than the differences a benchmark is after. So every variant is measured several times in
rotation, A B C A B C ..., so that drift hits all of them alike, and a ratio is claimed only where
the two variants' ranges (min to max over the repeats) do not overlap.

    samples = interleave({"A": time_a, "B": time_b}, repeats=5)   # name -> [seconds, ...]
    spread = Spread.of(samples["A"])                               # median, min, max
    print(ratio_claim(Spread.of(samples["B"]), spread))            # "1.36x (1.31-1.41)" or no claim
"""

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

NO_CLAIM = "ranges overlap: no claim"
MIN_REPEATS = 5
"""Fewest repeats a ratio may rest on: with 5 samples each, two variants whose ranges separate
differ in every pairing of their repeats."""


def interleave(variants: Mapping[str, Callable[[], float]], repeats: int = MIN_REPEATS,
               on_sample: Callable[[int, str, float], None] | None = None) -> dict[str, list[float]]:
    """Call every variant's ``measure()`` (one timing, any unit) ``repeats`` times in rotation.

    Returns name -> the ``repeats`` measurements in call order. ``on_sample(repeat, name, value)``
    is called after each (e.g. to print progress).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(repeats):
        for name, measure in variants.items():
            value = float(measure())
            samples[name].append(value)
            if on_sample is not None:
                on_sample(repeat, name, value)
    return samples


@dataclass(frozen=True)
class Spread:
    """Median, smallest and largest of one variant's repeated measurements (same unit as given)."""

    median: float
    low: float
    high: float
    count: int

    @classmethod
    def of(cls, values: Sequence[float]) -> "Spread":
        if not values:
            raise ValueError("no measurements to summarise")
        return cls(statistics.median(values), min(values), max(values), len(values))

    def separates_from(self, other: "Spread") -> bool:
        """Whether the two ranges are disjoint (touching ends count as overlap)."""
        return self.low > other.high or self.high < other.low

    def scaled(self, factor: float) -> "Spread":
        """The same spread in another unit (e.g. seconds -> milliseconds)."""
        return Spread(self.median * factor, self.low * factor, self.high * factor, self.count)

    def format(self, digits: int = 3) -> str:
        """``median (min-max)``, e.g. ``12.3 (12.1-12.9)``."""
        return f"{self.median:.{digits}f} ({self.low:.{digits}f}-{self.high:.{digits}f})"


def ratio_claim(numerator: Spread, denominator: Spread, min_repeats: int = MIN_REPEATS) -> str:
    """``numerator / denominator`` of the medians, with the range of ratios the extremes allow
    (``1.36x (1.31-1.41)``), where both have at least ``min_repeats`` measurements and their ranges
    separate; otherwise :data:`NO_CLAIM` (with the reason when it is too few repeats)."""
    if min(numerator.count, denominator.count) < min_repeats:
        return f"{NO_CLAIM} (fewer than {min_repeats} repeats)"
    if not numerator.separates_from(denominator):
        return NO_CLAIM
    return (f"{numerator.median / denominator.median:.3f}x "
            f"({numerator.low / denominator.high:.3f}-{numerator.high / denominator.low:.3f})")


def markdown_table(spreads: Mapping[str, Spread], baseline: str, unit: str = "ms", digits: int = 3) -> str:
    """One row per variant: median (min-max) in ``unit``, and its ratio to ``baseline`` as
    :func:`ratio_claim` allows (the baseline's own row says ``baseline``)."""
    if baseline not in spreads:
        raise ValueError(f"baseline {baseline!r} is not one of the variants {sorted(spreads)}")
    count = spreads[baseline].count
    lines = [f"| variant | {unit}, median (min-max) of {count} | vs {baseline} |", "|---|---:|---:|"]
    for name, spread in spreads.items():
        claim = "baseline" if name == baseline else ratio_claim(spread, spreads[baseline])
        lines.append(f"| {name} | {spread.format(digits)} | {claim} |")
    return "\n".join(lines)
