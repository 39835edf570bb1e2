"""safetensors for anyckpt: ``anyckpt.save(prefix, tensors, format="safetensors")``.

Registered under the ``anyckpt.formats`` entry-point group, so installing this package is all
it takes; reading detects ``PREFIX.safetensors`` by itself.
"""

from __future__ import annotations

from .format import SafetensorsFormat, SafetensorsReader

__all__ = ["SafetensorsFormat", "SafetensorsReader"]
