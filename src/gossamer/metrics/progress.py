"""Live progress bar: round, simulated time, accuracy."""

from __future__ import annotations

import sys
from typing import Any


class Progress:
    def __init__(self, total_rounds: int, enabled: bool = True) -> None:
        self.total, self.enabled, self.bar = total_rounds, enabled, None

    def start(self, initial: int) -> None:
        if self.enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=initial, unit="round", file=sys.stderr,
                            dynamic_ncols=True, leave=True)

    def update(self, row: dict[str, Any]) -> None:
        if self.bar is None:
            return
        self.bar.n = min(self.total, int(row["round"]))
        acc = row.get("test_accuracy")
        self.bar.set_postfix_str(
            f"sim {row['sim_time_s']:.1f}s acc {acc:.4f}" if acc is not None else "", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
