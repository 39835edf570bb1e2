"""The published artefacts as a user gets them: ``python -m build`` makes an sdist and a wheel
that ``twine check`` accepts; the wheel, installed with its dependencies into a fresh virtual
environment (no source tree on the path), runs ``anyckpt demo``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from fixture_paths import REPO_ROOT

pytestmark = pytest.mark.slow
TIMEOUT = 600


def _run(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        args, capture_output=True, text=True, timeout=TIMEOUT, check=False, **kwargs
    )
    assert result.returncode == 0, f"{args}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _user_env() -> dict[str, str]:
    """The environment without anything that would put this source tree on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.pop("VIRTUAL_ENV", None)
    return env


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--outdir", str(out), str(REPO_ROOT)], env=_user_env())
    return out


def test_sdist_and_wheel_pass_twine_check(dist: Path) -> None:
    files = sorted(p.name for p in dist.iterdir())
    assert files == ["anyckpt-0.1.0-py3-none-any.whl", "anyckpt-0.1.0.tar.gz"]
    result = _run([sys.executable, "-m", "twine", "check", "--strict", *map(str, dist.iterdir())])
    assert result.stdout.count("PASSED") == 2


def test_sdist_holds_the_sources_and_fixtures_and_nothing_else(dist: Path) -> None:
    with tarfile.open(dist / "anyckpt-0.1.0.tar.gz") as sdist:
        names = [n.split("/", 1)[1] for n in sdist.getnames() if "/" in n]
        size = sum(m.size for m in sdist.getmembers())
    tops = {n.split("/", 1)[0] for n in names}
    assert {"src", "tests", "protos", "tools", "docs", "pyproject.toml", "README.md"} <= tops
    assert not tops & {".venv", ".venv-tf", "plugins", "site", "dist", ".git"}
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    # The TF fixtures ship so the tests run from the sdist; they are the bulk, a few MB.
    assert "tests/fixtures/tf-2.21/v2_dtypes/manifest.json" in names
    assert size < 8 * 2**20
    with zipfile.ZipFile(dist / "anyckpt-0.1.0-py3-none-any.whl") as wheel:
        wheel_names = wheel.namelist()
    assert "anyckpt/py.typed" in wheel_names
    assert {n.split("/", 1)[0] for n in wheel_names} == {"anyckpt", "anyckpt-0.1.0.dist-info"}


def test_installed_wheel_runs_the_demo(dist: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], env=_user_env())
    python = venv / "bin" / "python"
    wheel = dist / "anyckpt-0.1.0-py3-none-any.whl"
    _run([str(python), "-m", "pip", "install", "--quiet", str(wheel)], env=_user_env())

    where = _run(
        [str(python), "-c", "import anyckpt; print(anyckpt.__file__)"],
        cwd=tmp_path,
        env=_user_env(),
    )
    assert Path(where.stdout.strip()).is_relative_to(venv)
    version = _run([str(venv / "bin" / "anyckpt"), "--version"], cwd=tmp_path, env=_user_env())
    assert version.stdout.strip() == "anyckpt 0.1.0"

    demo = [str(venv / "bin" / "anyckpt"), "demo", "--steps", "30", "--every", "10"]
    demo += ["--size-mib", "0.25", "--preserve-every", "0"]
    doc = json.loads(
        _run([*demo, str(tmp_path / "run"), "--json"], cwd=tmp_path, env=_user_env()).stdout
    )
    assert doc["restored_identical"] is True
    assert (doc["stopped_at"], doc["resumed_from"], doc["final_step"]) == (23, 20, 30)
    assert [Path(p).name for p in doc["kept"]] == ["ckpt-10", "ckpt-20", "ckpt-30"]
    assert doc["final_loss"] < doc["first_loss"]
    # The text a user reads, with the default directory (./anyckpt-demo).
    text = _run(demo, cwd=tmp_path, env=_user_env()).stdout
    assert "bit-identical" in text
    assert "anyckpt ls ./anyckpt-demo" in text
    assert sorted(p.name for p in (tmp_path / "anyckpt-demo").glob("*.index")) == [
        "ckpt-10.index",
        "ckpt-20.index",
        "ckpt-30.index",
    ]
