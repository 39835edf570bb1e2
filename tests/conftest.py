"""Shared pytest fixtures."""

from __future__ import annotations

import sys
from pathlib import Path

# -- object-store servers (tests/servers.py): s3_server, s3_bucket, gcs_server, gcs_bucket --
# Make tests/ importable in every pytest import mode, then register the fixtures here.
_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from servers import gcs_bucket, gcs_server, s3_bucket, s3_server  # noqa: E402, F401
