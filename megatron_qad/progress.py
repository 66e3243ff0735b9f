"""Progress lines for the long phases Megatron does not log: teacher generation, PTQ calibration,
evaluation by generation.

    progress = Progress("teacher generation", total=4096, unit="tokens")
    for ...:
        progress.advance(64)   # 64 more units done (and, by default, 64 tokens processed)

prints, on rank 0 only (every process where torch.distributed is not initialized), one line each
time another tenth of ``total`` is done, and a last line at the end:

    teacher generation: 30 % (1,229/4,096 tokens), 1,850 tokens/s, ETA 2 s
    teacher generation: 100 % (4,096 tokens) in 2.2 s, 1,862 tokens/s
"""

from __future__ import annotations

import time

import torch.distributed as dist


def duration(seconds: float) -> str:
    """``seconds`` for a person: ``0.4 s``, ``12 s``, ``3 min 05 s``, ``2 h 07 min``."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def say(line: str) -> None:
    """Print ``line`` on rank 0 only (every process where torch.distributed is not initialized)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(line, flush=True)


class Progress:
    """Reports ``what``'s progress through ``total`` units of work (``unit``: their name) in
    ``steps`` lines (see the module docstring); the rate is in tokens per second of wall time."""

    def __init__(self, what: str, total: int, unit: str = "tokens", steps: int = 10):
        self.what, self.total, self.unit, self.steps = what, int(total), unit, int(steps)
        self.done = self.tokens = self.reported = 0
        self.start = time.perf_counter()
        self.enabled = self.total > 0 and (not dist.is_initialized() or dist.get_rank() == 0)

    def advance(self, units: int, tokens: int | None = None) -> None:
        """``units`` more done, ``tokens`` (default: ``units``) more tokens processed with them."""
        self.done = min(self.done + units, self.total)
        self.tokens += units if tokens is None else tokens
        step = self.done * self.steps // self.total if self.total else 0
        if not self.enabled or step <= self.reported:
            return
        self.reported = step
        elapsed = time.perf_counter() - self.start
        rate = f"{self.tokens / elapsed:,.0f} tokens/s" if elapsed > 0 else "- tokens/s"
        if self.done == self.total:
            line = f"{self.what}: 100 % ({self.total:,} {self.unit}) in {duration(elapsed)}, {rate}"
        else:
            eta = elapsed * (self.total - self.done) / self.done
            line = (f"{self.what}: {100 * self.done // self.total} % ({self.done:,}/{self.total:,} {self.unit}), "
                    f"{rate}, ETA {duration(eta)}")
        say(line)
