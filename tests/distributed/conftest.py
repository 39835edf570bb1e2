"""Fixtures of the multi-process tests: the TF oracle (tests/interop) for the interop test."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent
for path in (_HERE, _HERE.parent / "interop"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from oracle_client import TFOracle, find_tf_python  # noqa: E402


@pytest.fixture(scope="session")
def tf_oracle(tmp_path_factory: pytest.TempPathFactory) -> TFOracle:
    """The TF oracle; fails (never skips) when the TF venv is missing."""
    python, source = find_tf_python()
    if not python.is_file():
        pytest.fail(
            f"the TF interop test needs the TF venv's python, but {python} (from {source}) "
            "does not exist (make test creates it)",
            pytrace=False,
        )
    return TFOracle(python, tmp_path_factory.mktemp("tf-oracle"))
