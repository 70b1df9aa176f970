"""Figures of a benchmark run: each printed with its goal as it comes, then a table of all of them."""

from __future__ import annotations

import math
import statistics


def log(message: str) -> None:
    print(message, flush=True)


class Results:
    def __init__(self):
        self.rows: list[tuple[str, str, str, bool | None]] = []

    def add(self, name: str, value: str, goal: str = "-", met: bool | None = None) -> None:
        self.rows.append((name, value, goal, met))
        verdict = "" if met is None else ("  [met]" if met else "  [NOT met]")
        log(f"   {name}: {value}" + (f"  (goal {goal})" if goal != "-" else "") + verdict)

    def table(self) -> str:
        head = ("figure", "value", "goal", "")
        rows = [head] + [(n, v, g, "-" if m is None else ("met" if m else "NOT met")) for n, v, g, m in self.rows]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
        return "\n".join([line(head), "  ".join("-" * w for w in widths)] + [line(r) for r in rows[1:]])


def p99(values: list[float]) -> float:
    """Nearest-rank 99th percentile."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, -(-99 * len(ordered) // 100) - 1)]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: list[float], unit: str = "s", digits: int = 2) -> str:
    """'median unit (median of n: v1, v2, ...)'; math.inf (never happened within the wait) prints as 'never'."""
    show = lambda v: "never" if math.isinf(v) else f"{v:.{digits}f}"  # noqa: E731
    med = median(values)
    if len(values) == 1:
        return f"{show(med)} {unit}" if not math.isinf(med) else "never"
    return f"{show(med)} {unit} (median of {len(values)}: " + ", ".join(show(v) for v in values) + ")"


def within(values: list[float], goal: float) -> bool:
    """Every repeat happened, and their median meets the goal."""
    return bool(values) and all(math.isfinite(v) for v in values) and median(values) <= goal
