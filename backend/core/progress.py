"""Progress on the command line: one bar per pipeline stage (``avface reconstruct``,
``avface demo``, ``avface export``)."""
from __future__ import annotations

import sys


class StageBars:
    """One tqdm progress bar per stage, on stderr."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.stage = None
        self.bar = None

    def __call__(self, stage: str, fraction: float, message: str = "") -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=100, desc=f"{stage:>9}", unit="%", file=sys.stderr, leave=True,
                            bar_format="{desc} |{bar}| {n:3.0f}% {elapsed} {postfix}")
        target = int(round(100 * min(max(fraction, 0.0), 1.0)))
        if target > self.bar.n:
            self.bar.update(target - self.bar.n)
        if message:
            self.bar.set_postfix_str(message, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
