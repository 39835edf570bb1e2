"""Shared fixtures for the TensorFlow interop tests (TF runs only in a subprocess)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Make the helper modules next to this file importable in every pytest import mode.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from oracle_client import FIXTURES_DIR, TFOracle, find_tf_python  # noqa: E402


@pytest.fixture(scope="session")
def tf_oracle(tmp_path_factory: pytest.TempPathFactory) -> TFOracle:
    """The TF oracle; fails (never skips) when the TF venv is missing."""
    python, source = find_tf_python()
    if not python.is_file():
        pytest.fail(
            f"TensorFlow interop tests need the TF venv's python, but {python} (from {source}) "
            "does not exist. Create it with `make test` (target .venv-tf/.installed) or point "
            "ANYCKPT_TF_PYTHON at a python that has tensorflow-cpu==2.21.0.",
            pytrace=False,
        )
    return TFOracle(python, tmp_path_factory.mktemp("tf-oracle"))


@pytest.fixture(scope="session")
def tf_fixtures() -> Path:
    """The TF 2.21 fixtures in the repository (used in place); fails if they are absent."""
    if not (FIXTURES_DIR / "README.md").is_file():
        pytest.fail(
            f"TF fixtures missing at {FIXTURES_DIR}: regenerate them with `make fixtures`",
            pytrace=False,
        )
    return Path(FIXTURES_DIR)
