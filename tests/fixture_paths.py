"""Where the tests find the TensorFlow-written fixtures: inside the repository, nowhere else.

``tests/fixtures/tf-2.21`` is written by ``tools/tf/make_fixtures.py`` (``make fixtures``) and
committed; its README.md says how. A missing fixture is a test failure, never a skip.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TF_FIXTURES = REPO_ROOT / "tests" / "fixtures" / "tf-2.21"
