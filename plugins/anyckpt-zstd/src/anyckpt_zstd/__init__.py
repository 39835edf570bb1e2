"""A zstd-compressed, chunked checkpoint format for anyckpt: ``format="zstd"``.

Registered under the ``anyckpt.formats`` entry-point group; reading detects ``PREFIX.zckpt``.
"""

from __future__ import annotations

from .format import ZstdFormat, ZstdReader

__all__ = ["ZstdFormat", "ZstdReader"]
