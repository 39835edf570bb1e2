"""CLI output: sizes, tables, JSON, and a progress bar that only a terminal sees."""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import sys
import time
import unicodedata
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import IO, Any

__all__ = [
    "Progress",
    "display_width",
    "format_bytes",
    "format_duration",
    "format_ratio",
    "format_time",
    "plural",
    "print_error_json",
    "print_json",
    "table",
    "truncate",
]


def format_bytes(n: float | None) -> str:
    """``1536`` -> ``1.5 KiB``; ``None`` -> ``?``. At most three digits before the point: a
    value that would show as 1000 or more of a unit (after rounding) is shown in the next
    (``1046835`` -> ``1.0 MiB``, not ``1022.3 KiB``)."""
    if n is None:
        return "?"
    if n < 1000:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if round(n, 1) < 1000 or unit == "TiB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def plural(count: int, noun: str, plural_form: str | None = None) -> str:
    """``1 tensor``, ``2 tensors``, ``0 files``."""
    return f"{count} {noun if count == 1 else plural_form or noun + 's'}"


def format_ratio(data: int, stored: int | None) -> str:
    """``256.0 KiB (stored 26 B, 0.01%)``-style text: data size, and the stored size with its
    share of the data when they differ."""
    if stored is None or stored == data:
        return format_bytes(data)
    share = f"{stored / data:.0%}" if data else "-"
    if data and stored / data < 0.01:
        share = f"{stored / data:.2%}"
    return f"{format_bytes(data)} (stored {format_bytes(stored)}, {share})"


def display_width(text: str) -> int:
    """Columns ``text`` takes on a terminal: East Asian wide and fullwidth characters take
    two, combining marks none."""
    width = 0
    for char in text:
        if unicodedata.combining(char):
            continue
        width += 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1
    return width


def pad(text: str, width: int, *, right: bool = False) -> str:
    fill = " " * max(width - display_width(text), 0)
    return fill + text if right else text + fill


def truncate(text: str, width: int) -> str:
    """``text`` cut to at most ``width`` columns, ending in ``…`` when cut."""
    if display_width(text) <= width:
        return text
    out, used = [], 0
    for char in text:
        w = display_width(char)
        if used + w > width - 1:
            break
        out.append(char)
        used += w
    return "".join(out) + "…"


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
    """Rows of cells as aligned text (by display width: CJK characters take two columns);
    the first row is the header. ``right``: columns aligned right (numbers)."""
    if not rows:
        return ""
    widths = [max(display_width(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [pad(cell, widths[i], right=i in right) for i, cell in enumerate(row)]
        lines.append((indent + "  ".join(cells)).rstrip())
    return "\n".join(lines)


#: The version of every JSON document's layout (``"schema_version"``, its first key): raised
#: when a key is renamed or removed; adding keys keeps it.
JSON_SCHEMA_VERSION = 2


def print_json(
    data: Any,
    stream: IO[str] | None = None,
    *,
    streamed: tuple[str, Iterable[Any]] | None = None,
) -> None:
    """One JSON document (indented, keys in insertion order) on stdout, led by
    ``"schema_version"``. ``streamed=(key, items)``: the top-level list under ``key`` (a key
    of ``data``, any value) is written item by item as ``items`` yields them, never held
    whole; the text is the same as for the list itself."""
    out = stream or sys.stdout
    if isinstance(data, dict):
        data = {"schema_version": JSON_SCHEMA_VERSION, **data}
    options: dict[str, Any] = {
        "ensure_ascii": False,
        "allow_nan": False,
        "default": _json_default,
    }
    if streamed is None:
        json.dump(data, out, indent=2, **options)
        out.write("\n")
        return
    key, items = streamed
    placeholder = f"\x00{secrets.token_hex(16)}\x00"  # no value of data can hold it
    data[key] = placeholder
    head, tail = json.dumps(data, indent=2, **options).split(json.dumps(placeholder))
    out.write(head)
    empty = True
    for item in items:
        out.write("[\n" if empty else ",\n")
        empty = False
        text = json.dumps(item, indent=2, **options)
        out.write("    " + text.replace("\n", "\n    "))  # json.dumps escapes newlines in strings
    out.write("[]" if empty else "\n  ]")
    out.write(tail)
    out.write("\n")


def print_error_json(code: int, message: str, stream: IO[str] | None = None) -> None:
    """The document ``--json`` prints when a command fails: ``{"ok": false, "error": ...}``."""
    print_json({"ok": False, "error": {"exit_code": int(code), "message": message}}, stream)


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
        """The bar's text for a terminal ``width`` columns wide. What does not fit is left
        out whole, least useful first (the note, the ETA, the rate), never cut mid-word."""
        elapsed = max(time.perf_counter() - self._started, 1e-9)
        rate = self.done / elapsed
        rate_text = (
            f"{format_bytes(rate)}/s" if self.unit == "bytes" else f"{rate:.0f} {self.unit}/s"
        )
        # (text, priority): lower priorities are dropped first when the line is too long.
        parts: list[tuple[str, int]] = [(self.label, 9)]
        if self.total:
            fraction = min(self.done / self.total, 1.0)
            eta = (self.total - self.done) / rate if rate > 0 and self.done else None
            bar_width = max(10, min(30, width // 4))
            filled = int(fraction * bar_width)
            parts.append(("[" + "#" * filled + "-" * (bar_width - filled) + "]", 4))
            parts.append((f"{fraction * 100:3.0f}%", 8))
            parts.append((f"{self._amount(self.done)}/{self._amount(self.total)}", 6))
            parts.append((rate_text, 3))
            if eta is None:
                parts.append(("ETA -", 2))
            else:
                parts.append(("ETA <1 s" if eta < 1 else f"ETA {format_duration(eta)}", 2))
        else:
            parts.append((self._amount(self.done), 7))
            parts.append((rate_text, 5))
            parts.append((format_duration(elapsed), 3))
        if self.note:
            parts.append((self.note, 1))
        limit = max(width - 1, 10)
        while len(parts) > 1 and display_width("  ".join(t for t, _ in parts)) > limit:
            lowest = min(range(1, len(parts)), key=lambda i: (parts[i][1], -i))
            del parts[lowest]
        return truncate("  ".join(t for t, _ in parts), limit)

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
