"""Test-side client of tf_oracle.py, plus bit-exact comparison and fixture loading."""

from __future__ import annotations

import base64
import itertools
import json
import os
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from fixture_paths import TF_FIXTURES
from tf_oracle import read_npz, write_npz

REPO_ROOT = Path(__file__).resolve().parents[2]
ORACLE_SCRIPT = Path(__file__).with_name("tf_oracle.py")
FIXTURES_DIR = TF_FIXTURES
DEFAULT_TIMEOUT = 180.0


class OracleError(AssertionError):
    """A tf_oracle.py command failed; the message carries TF's error and stderr tail."""


@dataclass
class ReadResult:
    """What TF's checkpoint reader saw in one checkpoint."""

    prefix: str
    tensors: dict[str, np.ndarray]
    dtypes: dict[str, str]
    shapes: dict[str, tuple[int, ...]]
    errors: dict[str, str]


def find_tf_python() -> tuple[Path, str]:
    """The TF venv's python (may not exist) and where that choice came from."""
    env = os.environ.get("ANYCKPT_TF_PYTHON")
    if env:
        return Path(env), "$ANYCKPT_TF_PYTHON"
    return REPO_ROOT / ".venv-tf" / "bin" / "python", "the default <repo>/.venv-tf"


class TFOracle:
    """Runs tf_oracle.py commands in the TF venv and parses their output."""

    def __init__(self, python: Path, workdir: Path, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.python = python
        self.workdir = workdir
        self.timeout = timeout
        self._counter = itertools.count()

    def _npz(self, stem: str) -> Path:
        return self.workdir / f"{stem}-{next(self._counter)}.npz"

    def run(self, *args: str) -> dict[str, Any]:
        """Run one command; return its JSON, or raise OracleError."""
        env = dict(os.environ)
        env["TF_CPP_MIN_LOG_LEVEL"] = "3"
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT / "src"), env.get("PYTHONPATH")) if p
        )
        cmd = [str(self.python), str(ORACLE_SCRIPT), *args]
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, timeout=self.timeout, env=env, check=False
            )
        except subprocess.TimeoutExpired as e:
            raise OracleError(f"tf_oracle {args[0]} timed out after {self.timeout} s") from e
        stderr_tail = "\n".join(proc.stderr.splitlines()[-25:])
        try:
            result: dict[str, Any] = json.loads(proc.stdout)
        except json.JSONDecodeError:
            raise OracleError(
                f"tf_oracle {args[0]} exited {proc.returncode} without JSON; stdout:\n"
                f"{proc.stdout[-2000:]}\nstderr:\n{stderr_tail}"
            ) from None
        if proc.returncode != 0 or "error" in result:
            raise OracleError(
                f"tf_oracle {args[0]} failed: {result.get('error')}\nstderr:\n{stderr_tail}"
            )
        return result

    def save_v1graph(
        self,
        checkpoints: Sequence[tuple[str | os.PathLike[str], Mapping[str, Any]]],
        *,
        sharded_devices: Mapping[str, int] | None = None,
        global_step: int | None = None,
        version: str = "V2",
    ) -> list[dict[str, Any]]:
        """Save each (prefix, tensors) with TF's graph-mode Saver; one TF process for all."""
        args = ["save-v1graph"]
        for prefix, tensors in checkpoints:
            npz = self._npz("save")
            write_npz(npz, tensors.items())
            args += [os.fspath(prefix), str(npz)]
        if sharded_devices is not None:
            args += ["--sharded-devices", json.dumps(dict(sharded_devices))]
        if global_step is not None:
            args += ["--global-step", str(global_step)]
        args += ["--version", version]
        results: list[dict[str, Any]] = self.run(*args)["results"]
        return results

    def read(self, prefix: str | os.PathLike[str]) -> ReadResult:
        """Every tensor of one checkpoint, via tf.train.load_checkpoint."""
        return self.read_many([prefix])[0]

    def read_many(self, prefixes: Iterable[str | os.PathLike[str]]) -> list[ReadResult]:
        """Like read, for several checkpoints in one TF process."""
        args, outs = ["read"], []
        for prefix in prefixes:
            outs.append(self._npz("read"))
            args += [os.fspath(prefix), str(outs[-1])]
        return [
            ReadResult(
                prefix=r["prefix"],
                tensors=dict(read_npz(out)),
                dtypes=r["dtypes"],
                shapes={k: tuple(v) for k, v in r["shapes"].items()},
                errors=r["errors"],
            )
            for r, out in zip(self.run(*args)["results"], outs, strict=True)
        ]

    def restore(
        self, prefix: str | os.PathLike[str], specs: Sequence[str | Sequence[str]]
    ) -> list[np.ndarray | str]:
        """RestoreV2 each key or (key, shape_and_slice[, dtype]); an error message on failure."""
        out = self._npz("restore")
        result = self.run("restore", os.fspath(prefix), json.dumps(list(specs)), str(out))
        arrays = iter(value for _, value in read_npz(out))
        return [r["error"] if "error" in r else next(arrays) for r in result["results"]]

    def state(self, directory: str | os.PathLike[str]) -> dict[str, Any]:
        """TF's get_checkpoint_state (as "state") and latest_checkpoint (as "latest")."""
        return self.run("state", os.fspath(directory))

    def manager_save(
        self,
        directory: str | os.PathLike[str],
        steps: Sequence[int],
        *,
        max_to_keep: int | None,
        keep_every_n_hours: float | None = None,
        sleep: float = 0.0,
    ) -> dict[str, Any]:
        """Save with a real tf.train.CheckpointManager at checkpoint numbers `steps`."""
        args = ["manager-save", os.fspath(directory), json.dumps(list(steps))]
        args += ["--max-to-keep", "none" if max_to_keep is None else str(max_to_keep)]
        if keep_every_n_hours is not None:
            args += ["--keep-every-n-hours", str(keep_every_n_hours)]
        if sleep:
            args += ["--sleep", str(sleep)]
        return self.run(*args)

    def coimport(
        self,
        *,
        order: str = "tf-first",
        imports: Sequence[str] = (),
        roundtrip_dir: str | os.PathLike[str] | None = None,
    ) -> dict[str, Any]:
        """Import anyckpt and TF in one process; see tf_oracle.cmd_coimport."""
        args = ["coimport", "--order", order]
        for module in imports:
            args += ["--import", module]
        if roundtrip_dir is not None:
            args += ["--roundtrip", os.fspath(roundtrip_dir)]
        return self.run(*args)


# --- comparison -------------------------------------------------------------------------------


def tensor_mismatch(actual: Any, expected: Any) -> str | None:
    """Why two tensors differ (dtype, shape or raw bytes), or None if bit-identical."""
    a, e = np.asarray(actual), np.asarray(expected)
    if e.dtype == object:
        if a.dtype != object:
            return f"dtype {a.dtype}, expected object array of bytes"
        if a.shape != e.shape:
            return f"shape {a.shape}, expected {e.shape}"
        bad = [type(x).__name__ for x in a.reshape(-1) if type(x) is not bytes]
        if bad:
            return f"string elements must be bytes, got {bad[:3]}"
        if a.reshape(-1).tolist() != e.reshape(-1).tolist():
            pairs = [
                (i, x[:40], y[:40])
                for i, (x, y) in enumerate(zip(a.reshape(-1), e.reshape(-1), strict=True))
                if x != y
            ]
            return f"string values differ at (flat index, actual, expected) {pairs[:3]}"
        return None
    if a.dtype != e.dtype:
        return f"dtype {a.dtype}, expected {e.dtype}"
    if a.shape != e.shape:
        return f"shape {a.shape}, expected {e.shape}"
    if np.ascontiguousarray(a).tobytes() != np.ascontiguousarray(e).tobytes():
        return f"bytes differ: {a.reshape(-1)[:8]!r} vs expected {e.reshape(-1)[:8]!r}"
    return None


def assert_tensors_identical(actual: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    """Same keys; every tensor has the same dtype, shape and raw bytes."""
    missing, extra = set(expected) - set(actual), set(actual) - set(expected)
    assert not missing, f"missing keys {sorted(missing)}"
    assert not extra, f"unexpected keys {sorted(extra)}"
    problems = {
        key: why
        for key in sorted(expected)
        if (why := tensor_mismatch(actual[key], expected[key])) is not None
    }
    details = "\n".join(f"  {k!r}: {v}" for k, v in problems.items())
    assert not problems, f"tensors differ:\n{details}"


def tf_dtype_name(value: Any) -> str:
    """TF's dtype name for a test tensor (object arrays are 'string')."""
    arr = np.asarray(value)
    return "string" if arr.dtype == object else arr.dtype.name


# --- fixtures ---------------------------------------------------------------------------------


def fixture_manifest(case: str) -> dict[str, Any]:
    """manifest.json of one fixture case."""
    manifest: dict[str, Any] = json.loads((FIXTURES_DIR / case / "manifest.json").read_text())
    return manifest


def fixture_expected(case: str, prefix: str) -> dict[str, np.ndarray]:
    """Expected tensors of one fixture checkpoint, decoded (bfloat16, strings from base64)."""
    (checkpoint,) = [c for c in fixture_manifest(case)["checkpoints"] if c["prefix"] == prefix]
    out: dict[str, np.ndarray] = {}
    for key, info in checkpoint["tensors"].items():
        arr = np.load(FIXTURES_DIR / case / info["expected"], allow_pickle=True)
        if info["npy_encoding"] == "bfloat16_bits_as_uint16":
            arr = arr.view(ml_dtypes.bfloat16)
        elif info["dtype"] == "string":
            flat = np.empty(len(info["values_b64"]), dtype=object)
            for i, b64 in enumerate(info["values_b64"]):
                flat[i] = base64.b64decode(b64)
            arr = flat.reshape(info["shape"])
        assert tf_dtype_name(arr) == info["dtype"], (key, arr.dtype, info["dtype"])
        assert list(arr.shape) == info["shape"], (key, arr.shape, info["shape"])
        out[key] = arr
    return out
