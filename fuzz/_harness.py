"""What the atheris harnesses share: instrumentation, and the loop around a target of
:mod:`targets` (which holds what each harness does with one input, without atheris).

Each harness feeds one kind of untrusted input to anyckpt and accepts only anyckpt's own
errors (:class:`anyckpt.CheckpointError`, and :class:`anyckpt.codecs.DecodeError` from the
sans-I/O codecs). Any other exception is a finding: atheris stops and writes the input. Hangs
and huge allocations are findings too (libFuzzer's ``-timeout`` and ``-rss_limit_mb``, set by
``run.py``).
"""

from __future__ import annotations

import contextlib
import importlib
import sys

import atheris

with atheris.instrument_imports(include=["anyckpt", "anyckpt_safetensors", "anyckpt_zstd"]):
    # Imported here to be instrumented (the targets use them).
    import anyckpt
    import anyckpt.api
    import anyckpt.cli._inspect
    import anyckpt.codecs
    import anyckpt.formats
    import anyckpt.manager
    import anyckpt.meta  # noqa: F401

    # The plugins (optional), instrumented too: loaded now rather than by the registry.
    for plugin in ("anyckpt_safetensors.format", "anyckpt_zstd.format"):
        with contextlib.suppress(ImportError):
            importlib.import_module(plugin)

from targets import TARGETS, WITH_CHECKSUMS, bypass_checksums, run_one


def main(harness: str) -> None:
    """Fuzz the target of ``harness`` (checksum comparisons bypassed unless the harness is in
    :data:`targets.WITH_CHECKSUMS`)."""
    target = TARGETS[harness]
    if harness not in WITH_CHECKSUMS:
        bypass_checksums()

    def test_one_input(data: bytes) -> None:
        run_one(target, data)

    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
