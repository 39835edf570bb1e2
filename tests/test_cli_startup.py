"""Starting the command: ``--version`` and ``--help`` load neither NumPy nor fsspec nor the
formats (``import anyckpt`` neither: its names are imported on first use); ``dir(anyckpt)``
is the public names; Ctrl-C while the command loads exits 130 with one line, no traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import anyckpt
from anyckpt.cli import COMMANDS, build_parser

#: Modules the command needs only to run a command: none may be loaded by --version/--help.
HEAVY = (
    "numpy",
    "ml_dtypes",
    "fsspec",
    "anyio",
    "google.protobuf",
    "anyckpt.storage",
    "anyckpt.formats",
    "anyckpt.manager",
    "anyckpt.api",
)
TIMEOUT = 120


def _imported_by(*args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run ``python -X importtime -m anyckpt ARGS``: its result, and every module it imported
    (importtime lists each on stderr; no time is looked at)."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "anyckpt", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    modules = {
        line.rsplit("|", 1)[1].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert "anyckpt.cli" in modules, result.stderr[-2000:]  # the listing is there
    return result, modules


@pytest.mark.parametrize("args", [["--version"], ["--help"], [], ["nonsense"]])
def test_version_and_help_load_nothing_heavy(args: list[str]) -> None:
    result, modules = _imported_by(*args)
    loaded = sorted(m for m in modules if m in HEAVY or m.startswith(tuple(f"{h}." for h in HEAVY)))
    assert loaded == [], loaded
    if args == ["--version"]:
        assert result.returncode == 0
        assert result.stdout.strip() == f"anyckpt {anyckpt.__version__}"
    elif args == ["--help"]:
        assert result.returncode == 0
        assert all(name in result.stdout for name in COMMANDS)
    else:
        assert result.returncode == 2


def test_a_command_does_load_what_it_needs() -> None:
    """The other side: the check above would pass if importtime listed nothing."""
    _, modules = _imported_by("ls", "--help")
    assert {"numpy", "fsspec", "anyckpt.storage"} <= modules


def test_the_light_help_is_the_full_help() -> None:
    """``--help`` without importing the commands says exactly what the full parser says (so
    COMMANDS matches each command's own help)."""
    assert build_parser(commands=False).format_help() == build_parser().format_help()


def test_dir_of_the_package_is_its_public_names() -> None:
    dunders = {n for n in dir(anyckpt) if n.startswith("__") and n.endswith("__")}
    assert set(dir(anyckpt)) == set(anyckpt.__all__) | dunders
    assert set(anyckpt.__all__) == {*anyckpt._ORIGINS, "__version__", "sync", "tf2"}  # modules
    assert "annotations" not in dir(anyckpt)
    assert not hasattr(anyckpt, "annotations")
    for name in anyckpt.__all__:
        assert getattr(anyckpt, name) is not None, name
    assert anyckpt.CheckpointManager.__module__ == "anyckpt.manager.core"


def test_import_anyckpt_is_light() -> None:
    code = (
        "import sys, anyckpt; assert anyckpt.__version__;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in {'numpy', 'fsspec'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT, check=True
    )
    assert out.stdout.strip() == "[]"


# -- Ctrl-C while loading ---------------------------------------------------------------------


def _loading_numpy(pid: int) -> bool:
    """Whether the process has mapped NumPy's extension: it is loading the command."""
    try:
        return "_multiarray_umath" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc (Linux)")
def test_ctrl_c_while_loading_exits_130_without_a_traceback(tmp_path: Path) -> None:
    """SIGINT sent while the command is importing NumPy and the rest (seen in /proc: NumPy's
    extension is mapped), a little later each time."""
    interrupted = 0
    for delay in (0.0, 0.0, 0.0, 0.002, 0.01, 0.05):
        proc = subprocess.Popen(
            [sys.executable, "-m", "anyckpt", "ls", str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + TIMEOUT
        while not _loading_numpy(proc.pid) and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.0005)
        time.sleep(delay)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=TIMEOUT)
        assert "Traceback" not in err, err
        if proc.returncode == 130:
            interrupted += 1
            assert err == "anyckpt: error: interrupted\n", err
        else:  # it had finished already: an ordinary listing of an empty directory
            assert proc.returncode in (0, 3), (proc.returncode, err)
    assert interrupted >= 4, "the command was rarely still loading: SIGINT came too late"
