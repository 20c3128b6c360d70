"""Reading a py-spy profile: the hottest functions of a worker, by own (self) samples."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Hot", "hot_functions"]


@dataclass(frozen=True, slots=True)
class Hot:
    """One function's share of the samples: ``self_pct`` in its own code, ``total_pct`` below."""

    function: str
    self_pct: float
    total_pct: float


def hot_functions(collapsed: Path, top: int = 15) -> tuple[int, list[Hot]]:
    """Samples in total and the ``top`` functions by self time, from ``py-spy --format raw``.

    Each line of the file is ``frame;frame;...;leaf count`` (outermost first).
    """
    own: Counter[str] = Counter()
    below: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            below[frame] += count
    if total == 0:
        return 0, []
    hot = [
        Hot(function, 100 * samples / total, 100 * below[function] / total)
        for function, samples in own.most_common(top)
    ]
    return total, hot
