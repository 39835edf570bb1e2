"""Pure, sans-I/O encoders and decoders: bytes in, structures out, and back.

Nothing here opens a file or touches an event loop, so every codec can be tested and fuzzed
on plain bytes. Decoders raise :class:`anyckpt.codecs.DecodeError`; the I/O layers above wrap
it in a :class:`anyckpt.CorruptCheckpointError` that names the file.
"""

from __future__ import annotations


class DecodeError(ValueError):
    """Bytes that do not decode. The caller adds the file name."""
