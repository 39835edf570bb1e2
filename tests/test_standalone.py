"""The repository stands alone: tests read nothing outside it, and the TF fixture corpus they
read is complete and consistent with its manifests."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
from fixture_paths import REPO_ROOT, TF_FIXTURES

TEXT_SUFFIXES = {".py", ".md", ".json", ".toml", ".txt", ".cfg", ".ini", ".yml", ".yaml", ".sh"}
#: Ways a test could reach outside the repository (spelled in pieces so this file is clean).
FORBIDDEN = [
    re.compile(re.escape("shared" + "/fixtures")),
    re.compile(r"""["']shared["']\s*/"""),  # Path(...) / <the sibling folder> / ...
    re.compile(r"""/\s*["']shared["']"""),
    re.compile(re.escape("/" + "work/")),  # an absolute path of one machine
    re.compile(re.escape("ANYCKPT_TF_" + "FIXTURES")),  # an override pointing elsewhere
]


def _test_sources() -> list[Path]:
    roots = [REPO_ROOT / "tests", *sorted((REPO_ROOT / "plugins").glob("*/tests"))]
    return sorted(
        p
        for root in roots
        for p in root.rglob("*")
        if p.is_file() and p.suffix in TEXT_SUFFIXES and TF_FIXTURES not in p.parents
    )


def test_no_test_refers_to_anything_outside_the_repository() -> None:
    sources = _test_sources()
    assert len(sources) > 30
    hits = [
        f"{p.relative_to(REPO_ROOT)}:{n}: {line.strip()}"
        for p in sources
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if any(rx.search(line) for rx in FORBIDDEN)
    ]
    assert hits == []


def test_the_fixture_root_is_inside_the_repository() -> None:
    assert REPO_ROOT in TF_FIXTURES.parents
    assert (TF_FIXTURES / "README.md").is_file()
    assert "tools/tf/make_fixtures.py" in (TF_FIXTURES / "README.md").read_text()


def _generator() -> ModuleType:
    path = REPO_ROOT / "tools" / "tf" / "make_fixtures.py"
    spec = importlib.util.spec_from_file_location("make_fixtures", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)  # imports NumPy only; TensorFlow inside its functions
    return module


CASES = sorted(_generator().CASES)


def test_every_case_of_the_generator_is_committed() -> None:
    assert len(CASES) == 8
    on_disk = sorted(p.name for p in TF_FIXTURES.iterdir() if p.is_dir())
    assert on_disk == CASES


@pytest.mark.parametrize("case", CASES)
def test_fixture_case_matches_its_manifest(case: str) -> None:
    """Every file the manifest lists is there with its size, every expected .npy exists, and
    the numeric ones hash to the recorded sha256 of the tensor bytes."""
    folder = TF_FIXTURES / case
    manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["case"] == case
    assert manifest["tf_version"] == "2.21.0"
    files = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
    files.pop("manifest.json")
    assert files == manifest["files"]
    assert manifest["checkpoints"]
    for ckpt in manifest["checkpoints"]:
        assert ckpt["verified_with_tf_reader"] is True
        assert set(ckpt["files"]) <= set(files)
        for key, meta in ckpt["tensors"].items():
            npy = folder / meta["expected"]
            assert npy.is_file(), (key, npy)
            if "sha256" in meta and meta["npy_encoding"] in ("native", "bfloat16_bits_as_uint16"):
                import numpy as np

                array = np.load(npy)
                assert list(array.shape) == meta["shape"], key
                data = np.ascontiguousarray(array.astype(array.dtype.newbyteorder("<"))).tobytes()
                assert hashlib.sha256(data).hexdigest() == meta["sha256"], key


def test_ci_workflow_runs_make_test_on_every_supported_python() -> None:
    """.github/workflows/ci.yml runs what .ci/run runs (`make test`), once per CPython from
    requires-python up to 3.13."""
    import yaml  # installed with mkdocs (the docs extra)

    workflow = yaml.safe_load((REPO_ROOT / ".github" / "workflows" / "ci.yml").read_text())
    job = workflow["jobs"]["test"]
    assert job["strategy"]["matrix"]["python"] == ["3.10", "3.11", "3.12", "3.13"]
    assert any(step.get("run", "").startswith("make test") for step in job["steps"])
    assert "make test" in (REPO_ROOT / ".ci" / "run").read_text()
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert 'requires-python = ">=3.10"' in pyproject
    assert "[project.urls]" not in pyproject  # no address is published yet; none is invented
