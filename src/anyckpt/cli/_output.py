"""CLI output: sizes, tables, JSON, and a progress bar that only a terminal sees."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from typing import IO, Any

__all__ = [
    "Progress",
    "format_bytes",
    "format_duration",
    "format_time",
    "print_json",
    "table",
]


def format_bytes(n: float | None) -> str:
    """``1536`` -> ``1.5 KiB``; ``None`` -> ``?``."""
    if n is None:
        return "?"
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    """A short human duration: ``850 µs``, ``12.3 ms``, ``4.2 s``, ``3m05s``."""
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def format_time(timestamp: float | None) -> str:
    """Local time, to the second (``2026-11-21 14:03:07``)."""
    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def table(rows: Sequence[Sequence[str]], *, right: Sequence[int] = (), indent: str = "") -> str:
    """Rows of cells as aligned text; the first row is the header. ``right``: columns
    aligned right (numbers)."""
    if not rows:
        return ""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append((indent + "  ".join(cells)).rstrip())
    return "\n".join(lines)


def print_json(data: Any, stream: IO[str] | None = None) -> None:
    """One JSON document (indented, keys in insertion order) on stdout."""
    out = stream or sys.stdout
    json.dump(data, out, indent=2, ensure_ascii=False, allow_nan=False, default=_json_default)
    out.write("\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def stream_is_terminal(stream: IO[str]) -> bool:
    """Whether ``stream`` is a terminal that understands ``\\r`` redraws."""
    try:
        return stream.isatty() and os.environ.get("TERM", "") != "dumb"
    except (AttributeError, ValueError):
        return False


class Progress:
    """A one-line progress bar on stderr: bytes done, rate and ETA.

    It draws only when ``enabled`` (the CLI enables it when stderr is a terminal), at most ten
    times a second, and erases itself on :meth:`close`, so what is printed after it starts on a
    clean line. With ``total=None`` it shows bytes and rate only.
    """

    def __init__(
        self,
        label: str,
        total: int | None,
        *,
        enabled: bool,
        stream: IO[str] | None = None,
        unit: str = "bytes",
    ) -> None:
        self.label = label
        self.total = total
        self.enabled = enabled
        self.unit = unit
        self.done = 0
        self.note = ""
        self._stream = stream or sys.stderr
        self._started = time.perf_counter()
        self._drawn_at = 0.0
        self._visible = False

    def __enter__(self) -> Progress:
        self.draw(force=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def advance(self, amount: int, note: str | None = None) -> None:
        self.done += amount
        if note is not None:
            self.note = note
        self.draw()

    def _amount(self, n: float) -> str:
        return format_bytes(n) if self.unit == "bytes" else f"{int(n)}"

    def render(self, width: int) -> str:
        """The bar's text for a terminal ``width`` columns wide."""
        elapsed = max(time.perf_counter() - self._started, 1e-9)
        rate = self.done / elapsed
        rate_text = (
            f"{format_bytes(rate)}/s" if self.unit == "bytes" else f"{rate:.0f} {self.unit}/s"
        )
        parts = [self.label]
        if self.total:
            fraction = min(self.done / self.total, 1.0)
            eta = (self.total - self.done) / rate if rate > 0 and self.done else None
            bar_width = max(10, min(30, width // 4))
            filled = int(fraction * bar_width)
            parts.append("[" + "#" * filled + "-" * (bar_width - filled) + "]")
            parts.append(f"{fraction * 100:3.0f}%")
            parts.append(f"{self._amount(self.done)}/{self._amount(self.total)}")
            parts.append(rate_text)
            if eta is None:
                parts.append("ETA -")
            else:
                parts.append("ETA <1 s" if eta < 1 else f"ETA {format_duration(eta)}")
        else:
            parts.append(self._amount(self.done))
            parts.append(rate_text)
        if self.note:
            parts.append(self.note)
        return "  ".join(parts)[: max(width - 1, 10)]

    def draw(self, *, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self._drawn_at < 0.1:
            return
        self._drawn_at = now
        width = shutil.get_terminal_size((80, 24)).columns
        self._stream.write("\r\x1b[K" + self.render(width))
        self._stream.flush()
        self._visible = True

    def clear(self) -> None:
        """Erase the bar (to print a line above it); the next ``draw`` brings it back."""
        if self.enabled and self._visible:
            self._stream.write("\r\x1b[K")
            self._stream.flush()
            self._visible = False
            self._drawn_at = 0.0

    def close(self) -> None:
        self.clear()
        self.enabled = False
