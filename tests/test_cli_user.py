"""What a new user hit with the ``anyckpt`` command (issue 15), run as a user runs it: the
console script in a subprocess, on a pseudo-terminal where the terminal matters.

Every checkpoint here is written by anyckpt itself in a temporary directory (no fixture files).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_cli import ANYCKPT, TIMEOUT, run, run_pty

import anyckpt
from anyckpt.cli._output import Progress, display_width, format_bytes

# -- helpers -----------------------------------------------------------------------------------


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one ``anyckpt: error:`` line on stderr (there must be exactly one)."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("anyckpt: error: ")]
    assert len(lines) == 1, result.stderr
    assert "Errno" not in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return lines[0]


def run_json(*args: str) -> tuple[int, dict[str, Any]]:
    result = run(*args, "--json")
    document = json.loads(result.stdout)
    assert document["schema_version"] >= 1
    return result.returncode, document


def run_on_terminal(*args: str, columns: int) -> tuple[int, str]:
    """Run the console script on a pseudo-terminal ``columns`` wide (set with TIOCSWINSZ,
    no COLUMNS variable), returning its status and everything it wrote."""
    return run_pty(*args, columns=columns)


def flip_byte(path: Path, needle: bytes) -> None:
    data = bytearray(path.read_bytes())
    assert data.count(needle) == 1
    data[data.index(needle)] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def v2(tmp_path: Path) -> Path:
    """A V2 checkpoint ``run/ckpt-5`` (with a .meta) and a state file naming it."""
    prefix = tmp_path / "run" / "ckpt-5"
    tensors = {
        "encoder/w": np.arange(6, dtype=np.float32).reshape(3, 2),
        "encoder/b": np.ones(4, np.float32),
        "decoder/w": np.full((2, 2), 7.0),
    }
    anyckpt.sync.save(prefix, tensors, write_meta_graph=True)
    (tmp_path / "run" / "checkpoint").write_text('model_checkpoint_path: "ckpt-5"\n')
    return prefix


# -- defect 1: any file of a checkpoint names the checkpoint --------------------------------------


def test_every_file_of_a_v2_checkpoint_resolves_to_it(v2: Path) -> None:
    names = [f"{v2}.index", f"{v2}.data-00000-of-00001", f"{v2}.meta", str(v2)]
    for name in names:
        result = run("verify", name)
        assert result.returncode == 0, (name, result.stderr)
        assert f"ok       {v2}  (3 tensors" in result.stdout
        code, doc = run_json("inspect", name)
        assert code == 0
        assert doc["prefix"] == str(v2)
        assert [t["key"] for t in doc["tensors"]] == ["decoder/w", "encoder/b", "encoder/w"]
    assert run("diff", f"{v2}.index", f"{v2}.data-00000-of-00001").returncode == 0
    out = v2.parent / "copy"
    assert run("convert", f"{v2}.index", str(out)).returncode == 0
    assert run("diff", str(v2), str(out)).returncode == 0
    # The library resolves the same way.
    loaded = anyckpt.sync.load(f"{v2}.index")
    assert sorted(loaded) == ["decoder/w", "encoder/b", "encoder/w"]
    with anyckpt.sync.open(f"{v2}.data-00000-of-00001") as reader:
        assert reader.prefix == str(v2)


def test_one_shard_of_a_sharded_v1_checkpoint_shows_the_whole(tmp_path: Path) -> None:
    prefix = tmp_path / "model"
    tensors = {"a": np.arange(4.0), "b": np.ones(3), "c": np.zeros(2, np.int32)}
    files = anyckpt.sync.save(prefix, tensors, format="v1", options={"num_shards": 2})
    assert len(files) == 2
    for shard in files:
        code, doc = run_json("inspect", shard)
        assert code == 0
        assert [t["key"] for t in doc["tensors"]] == ["a", "b", "c"]
        assert len(doc["files"]) == 2
        result = run("verify", shard)
        assert result.returncode == 0
        assert "3 tensors" in result.stdout
        assert sorted(anyckpt.sync.load(shard)) == ["a", "b", "c"]


# -- defect 4: files that are no checkpoint ------------------------------------------------------


def test_files_that_are_no_checkpoint_say_what_they_are(tmp_path: Path, v2: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    lonely_meta = tmp_path / "gone.meta"
    shutil.copy(f"{v2}.meta", lonely_meta)
    garbage = tmp_path / "weights.safetensors"
    garbage.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00not json at all")
    orphan_dir = tmp_path / "orphan"
    orphan_dir.mkdir()
    shutil.copy(f"{v2}.data-00000-of-00001", orphan_dir / "ckpt-9.data-00000-of-00001")
    cases = {
        str(text): ("not a checkpoint file", 3),
        str(v2.parent / "checkpoint"): ("directory's state file", 3),
        str(lonely_meta): ("meta graph (.meta)", 3),
        str(garbage): ("not one", 1),
        str(orphan_dir / "ckpt-9.data-00000-of-00001"): ("ckpt-9.index is missing", 3),
    }
    for target, (phrase, code) in cases.items():
        for command in ("inspect", "verify"):
            result = run(command, target)
            assert result.returncode == code, (command, target, result.stderr)
            line = error_line(result)
            assert phrase in line, line
            assert target in line, line


# -- defect 3: formats without checksums ---------------------------------------------------------


def test_verify_says_when_a_format_has_no_checksums(tmp_path: Path) -> None:
    values = np.arange(64, dtype=np.float64) + 0.5
    prefix = tmp_path / "weights"
    anyckpt.sync.save(prefix, {"w": values}, format="safetensors")
    flip_byte(tmp_path / "weights.safetensors", values[10:11].tobytes())
    result = run("verify", f"{prefix}.safetensors")
    assert result.returncode == 0
    assert "structure checked; this format has no checksums" in result.stdout
    code, doc = run_json("verify", str(prefix))
    assert code == 0
    assert doc["checkpoints"][0]["checksums"] is False
    # A format with checksums finds the same flip.
    anyckpt.sync.save(tmp_path / "v2", {"w": values})
    flip_byte(tmp_path / "v2.data-00000-of-00001", values[10:11].tobytes())
    result = run("verify", str(tmp_path / "v2"))
    assert result.returncode == 1
    assert "no checksums" not in result.stdout


# -- defect 5: format options --------------------------------------------------------------------


def test_format_options_are_checked(tmp_path: Path, v2: Path) -> None:
    cases = [
        ("zstd", "level=abc", "option 'level' of format 'zstd' must be int"),
        ("zstd", "bogus=1", "unknown option 'bogus'"),
        ("zstd", "levle=9", "level (int)"),
        ("v2", "num_shard=3", "num_shards (int)"),
        ("zstd", "shuffle=3", "must be bool"),
        ("zstd", "level=99", "out of range"),
        ("v2", "num_shards=0", "positive integer"),
    ]
    for fmt, option, phrase in cases:
        result = run(
            "convert", str(v2), str(tmp_path / "out"), "-f", fmt, "--format-option", option
        )
        assert result.returncode == 2, (option, result.stderr)
        assert phrase in error_line(result)
        assert not list(tmp_path.glob("out*"))
    ok = run("convert", str(v2), str(tmp_path / "out"), "--format-option", "num_shards=2")
    assert ok.returncode == 0, ok.stderr
    assert len(list(tmp_path.glob("out.data-*"))) == 2
    # The library: one error type, both a ValueError and a TypeError.
    with pytest.raises(ValueError, match="valid options: level"):
        anyckpt.sync.save(tmp_path / "z", {"a": np.ones(2)}, format="zstd", options={"levle": 9})
    with pytest.raises(TypeError, match="num_shards"):
        anyckpt.sync.save(tmp_path / "z", {"a": np.ones(2)}, options={"num_shards": "3"})
    with pytest.raises(anyckpt.InvalidOptionError):
        anyckpt.sync.CheckpointManager(tmp_path / "m", format_options={"num_shard": 3})


# -- defect 8: data size and stored size ---------------------------------------------------------


def test_compressed_formats_report_data_and_stored_size(tmp_path: Path) -> None:
    src = tmp_path / "src"
    anyckpt.sync.save(src, {"zeros": np.zeros((256, 256), np.float32)})
    code, doc = run_json("convert", str(src), str(tmp_path / "z"), "-f", "zstd")
    assert code == 0
    assert doc["bytes"] == 256 * 256 * 4
    assert 0 < doc["stored_bytes"] < doc["bytes"] // 100
    assert doc["files"][0]["size"] == doc["stored_bytes"]
    result = run("inspect", str(tmp_path / "z"))
    assert result.returncode == 0
    head = result.stdout.splitlines()[0]
    assert "256.0 KiB (stored" in head
    row = next(line for line in result.stdout.splitlines() if line.strip().startswith("zeros"))
    assert "256.0 KiB" in row
    code, doc = run_json("inspect", str(tmp_path / "z"))
    assert doc["tensors"][0]["nbytes"] == 262144
    assert doc["tensors"][0]["stored_nbytes"] < 262144


# -- defect 9: the progress bar ------------------------------------------------------------------

_FRAME_END = re.compile(
    r"(\d+(\.\d)? (B|KiB|MiB|GiB)(/s)?|ETA .+|\d+%|\]|\d+(\.\d)? (µs|ms|s)|\d+m\d\ds|as zstd)$"
)


@pytest.mark.parametrize("columns", [80, 200])
def test_progress_bar_counts_the_write_and_fits_the_terminal(tmp_path: Path, columns: int) -> None:
    rng = np.random.default_rng(1)
    src = tmp_path / "src"
    anyckpt.sync.save(src, {f"t{i}": rng.standard_normal(1 << 18) for i in range(8)})
    code, output = run_on_terminal(
        "convert", str(src), str(tmp_path / "dst"), "-f", "zstd", columns=columns
    )
    assert code == 0, output
    frames = [f.strip("\r\n") for f in output.split("\r\x1b[K") if f.strip("\r\n")]
    bars = [f for f in frames if f.startswith(("reading", "writing"))]
    writes = [f for f in bars if f.startswith("writing")]
    assert writes, output
    # The write phase counts bytes: its last frame shows what was written, not 0 B.
    stored = (tmp_path / "dst.zckpt").stat().st_size
    assert format_bytes(stored) in writes[-1], writes[-1]
    for frame in bars:
        assert display_width(frame) <= columns - 1, frame
        assert _FRAME_END.search(frame), f"cut mid-word: {frame!r}"
    if columns >= 200:
        assert any("16.0 MiB of data as zstd" in f for f in writes), writes


# -- defect 11: permission errors ----------------------------------------------------------------


def _unprivileged() -> list[str]:
    """A command prefix under which this process's files are subject to permissions: as root,
    drop CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH (root without them is an ordinary owner)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.fail("running as root needs setpriv (util-linux) to test permission errors")
    caps = "-dac_override,-dac_read_search"
    return [setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}"]


def test_an_unreadable_data_file_is_one_access_error(tmp_path: Path) -> None:
    prefix = tmp_path / "ckpt-1"
    anyckpt.sync.save(prefix, {f"t{i}": np.full(8, i, np.float32) for i in range(6)})
    data = tmp_path / "ckpt-1.data-00000-of-00001"
    data.chmod(0)
    try:
        env = {**os.environ, "COLUMNS": "120"}

        def as_user(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [*_unprivileged(), ANYCKPT, *args],
                capture_output=True,
                text=True,
                env=env,
                timeout=TIMEOUT,
                check=False,
            )

        probe = subprocess.run(
            [*_unprivileged(), "cat", str(data)], capture_output=True, check=False
        )
        assert probe.returncode != 0, "the data file is readable: the test would prove nothing"
        result = as_user("verify", str(prefix))
        assert result.returncode == 5, result.stdout + result.stderr
        assert "DAMAGED" not in result.stdout
        assert result.stdout.count("permission denied") == 1
        assert "6 tensors not checked" in result.stdout
        assert "permission denied" in error_line(result)
        inspected = as_user("inspect", str(prefix))
        assert inspected.returncode == 0, inspected.stderr
        assert "6 tensors" in inspected.stdout
        values = as_user("inspect", str(prefix), "--values")
        assert values.returncode == 5
        assert "permission denied" in error_line(values)
    finally:
        data.chmod(0o644)


# -- defect 13: an unreadable state file ---------------------------------------------------------


def test_a_malformed_state_file_is_called_unreadable(v2: Path) -> None:
    directory = v2.parent
    (directory / "checkpoint").write_text("model_checkpoint_path: {{{ not a proto\n")
    listing = run("ls", str(directory))
    assert listing.returncode == 0
    head = listing.stdout.splitlines()[0]
    assert "state file: unreadable (" in head
    assert "no state file" not in listing.stdout
    assert str(directory / "checkpoint") not in head  # the reason, without the path again
    verified = run("verify", str(directory))
    assert verified.returncode == 1
    line = next(x for x in verified.stdout.splitlines() if "unreadable state file" in x)
    assert line.count(str(directory / "checkpoint")) == 1
    assert "1 of 1 checkpoint ok" in verified.stdout
    inspected = run("inspect", str(directory))
    assert inspected.returncode == 1
    assert "unreadable state file" in error_line(inspected)


# -- defect 14: small things ---------------------------------------------------------------------


def test_tables_align_wide_characters(tmp_path: Path) -> None:
    prefix = tmp_path / "cjk"
    anyckpt.sync.save(prefix, {"编码器/权重": np.ones(3), "b": np.ones((2, 2), np.int32)})
    result = run("inspect", str(prefix))
    rows = [line for line in result.stdout.splitlines() if "float64" in line or "int32" in line]
    assert len(rows) == 2
    starts = {
        display_width(row[: row.index(dt)])
        for row, dt in zip(rows, ("int32", "float64"), strict=False)
    }
    assert len(starts) == 1, rows


def test_counts_are_singular_when_one(tmp_path: Path) -> None:
    prefix = tmp_path / "one"
    anyckpt.sync.save(prefix, {"only": np.ones(1)}, format="safetensors")
    head = run("inspect", str(prefix)).stdout.splitlines()[0]
    assert "1 file," in head
    assert "1 tensor," in head
    assert "1 parameter," in head
    verified = run("verify", str(prefix))
    assert "(1 tensor," in verified.stdout
    assert "tensors" not in verified.stdout


def test_sizes_roll_over_to_the_next_unit(tmp_path: Path) -> None:
    prefix = tmp_path / "big"
    anyckpt.sync.save(prefix, {"x": np.zeros(1046835, np.uint8)})  # 1022.3 KiB
    result = run("inspect", str(prefix))
    assert "1.0 MiB" in result.stdout
    assert "KiB" not in result.stdout.splitlines()[-1]


@given(st.integers(min_value=0, max_value=1 << 50))
def test_format_bytes_never_shows_1024_of_a_unit(n: int) -> None:
    text = format_bytes(n)
    number, unit = text.split(" ")
    assert float(number) < 1000 or unit == "TiB"
    scale = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}[unit]
    assert abs(float(number) * scale - n) <= 0.05 * scale + 0.5


@given(st.text(max_size=20))
def test_display_width_counts_wide_characters_twice(text: str) -> None:
    expected = sum(
        0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1
        for c in text
    )
    assert display_width(text) == expected


def test_negative_tolerances_are_usage_errors(v2: Path) -> None:
    for option in ("--atol", "--rtol"):
        for bad in ("-1", "nan", "x"):
            result = run("diff", str(v2), str(v2), option, bad)
            assert result.returncode == 2, (option, bad)
            assert option in result.stderr or bad in result.stderr


def test_json_failures_print_an_error_document(tmp_path: Path, v2: Path) -> None:
    cases = [
        (["inspect", str(tmp_path / "missing")], 3),
        (["diff", str(v2), str(v2), "--atol", "-1"], 2),
        (["convert", str(v2), str(tmp_path / "o"), "-f", "zstd", "--format-option", "x=1"], 2),
    ]
    for args, code in cases:
        result = run(*args, "--json")
        assert result.returncode == code
        doc = json.loads(result.stdout)
        assert doc["schema_version"] >= 1
        assert doc["ok"] is False
        assert doc["error"]["exit_code"] == code
        assert doc["error"]["message"]


def test_every_json_document_has_a_schema_version_and_files_look_alike(v2: Path) -> None:
    directory = str(v2.parent)
    documents = [
        run_json("ls", directory),
        run_json("inspect", str(v2)),
        run_json("verify", str(v2)),
        run_json("diff", str(v2), str(v2)),
    ]
    assert all(code == 0 for code, _ in documents)
    ls_files = documents[0][1]["checkpoints"][0]["files"]
    inspect_files = documents[1][1]["files"]
    assert ls_files == inspect_files
    assert set(ls_files[0]) == {"name", "path", "size"}


# -- what users expect ---------------------------------------------------------------------------


def test_inspect_counts_parameters_and_selects_by_glob(v2: Path) -> None:
    head = run("inspect", str(v2)).stdout.splitlines()[0]
    assert "14 parameters" in head  # 6 + 4 + 4
    _, doc = run_json("inspect", str(v2), "-k", "encoder/*")
    assert [t["key"] for t in doc["tensors"]] == ["encoder/b", "encoder/w"]
    assert doc["parameters"] == 10
    result = run("inspect", str(v2), "-k", "nothing/*")
    assert result.returncode == 3
    assert "no tensor matches 'nothing/*'" in error_line(result)


def test_inspect_shows_safetensors_metadata_and_cuts_long_strings(tmp_path: Path) -> None:
    prefix = tmp_path / "meta"
    anyckpt.sync.save(
        prefix, {"w": np.ones(2)}, format="safetensors", options={"metadata": {"epoch": "12"}}
    )
    result = run("inspect", str(prefix))
    assert "metadata:" in result.stdout
    assert re.search(r"epoch\s+12", result.stdout)
    assert run_json("inspect", str(prefix))[1]["metadata"] == {"epoch": "12"}
    long = b"x" * 5000
    anyckpt.sync.save(tmp_path / "s", {"s": np.array([long, b"short"], dtype=object)})
    shown = run("inspect", str(tmp_path / "s"), "--values")
    assert shown.returncode == 0
    assert long not in shown.stdout.encode()
    assert "b'short'" in shown.stdout
    assert "cut" in shown.stdout
    full = run_json("inspect", str(tmp_path / "s"), "--values")[1]
    assert full["tensors"][0]["values"][0] == long.decode()


def test_convert_selects_tensors_and_names_a_string_tensor(tmp_path: Path) -> None:
    src = tmp_path / "tf2"
    graph = np.array(b"\x0a\x21 object graph bytes", dtype=object)
    anyckpt.sync.save(
        src,
        {
            "_CHECKPOINTABLE_OBJECT_GRAPH": graph,
            "model/w/.ATTRIBUTES/VARIABLE_VALUE": np.ones((2, 3), np.float32),
            "model/b/.ATTRIBUTES/VARIABLE_VALUE": np.zeros(3, np.float32),
        },
    )
    # The TF2 object graph is left out of a format TF does not read, with a note (docs/cli.md).
    dropped = run("convert", str(src), str(tmp_path / "auto"), "-f", "safetensors")
    assert dropped.returncode == 0
    assert "tf.train.Checkpoint cannot restore the copy" in dropped.stdout
    # Any other string tensor is named when the target format cannot hold it.
    vocab = tmp_path / "vocab"
    anyckpt.sync.save(vocab, {"vocab": np.array([b"a", b"b"], dtype=object), "w": np.ones(2)})
    refused = run("convert", str(vocab), str(tmp_path / "st-vocab"), "-f", "safetensors")
    assert refused.returncode == 4
    assert "'vocab' is a string tensor" in error_line(refused)
    ok = run("convert", str(src), str(tmp_path / "st"), "-f", "safetensors", "-x", "_CHECK*")
    assert ok.returncode == 0
    assert "1 left out" in ok.stdout
    assert sorted(anyckpt.sync.load(tmp_path / "st")) == [
        "model/b/.ATTRIBUTES/VARIABLE_VALUE",
        "model/w/.ATTRIBUTES/VARIABLE_VALUE",
    ]
    only = run("convert", str(src), str(tmp_path / "w"), "-k", "model/w/*")
    assert only.returncode == 0
    assert list(anyckpt.sync.load(tmp_path / "w")) == ["model/w/.ATTRIBUTES/VARIABLE_VALUE"]


def test_ls_takes_several_directories_and_recurses(tmp_path: Path) -> None:
    for name in ("exp/a", "exp/b/deep"):
        with anyckpt.sync.CheckpointManager(tmp_path / name) as manager:
            manager.save({"w": np.ones(256, np.float32)}, step=1)
            manager.wait()
    (tmp_path / "exp" / "empty").mkdir()
    result = run("ls", "-r", str(tmp_path / "exp"))
    assert result.returncode == 0
    assert str(tmp_path / "exp" / "b" / "deep") in result.stdout
    assert str(tmp_path / "exp" / "empty") not in result.stdout
    assert re.search(r"total: 2 checkpoints in 3 directories, \d", result.stdout)
    code, doc = run_json("ls", str(tmp_path / "exp" / "a"), str(tmp_path / "exp" / "b" / "deep"))
    assert code == 0
    assert doc["checkpoints"] == 2
    assert doc["size"] == sum(d["size"] for d in doc["directories"]) > 2048


def test_diff_rtol(tmp_path: Path) -> None:
    base = np.array([100.0, 1000.0, 0.5])
    anyckpt.sync.save(tmp_path / "a", {"x": base})
    anyckpt.sync.save(tmp_path / "b", {"x": base * 1.001})
    assert run("diff", str(tmp_path / "a"), str(tmp_path / "b")).returncode == 1
    assert run("diff", str(tmp_path / "a"), str(tmp_path / "b"), "--rtol", "1e-2").returncode == 0
    loose = run("diff", str(tmp_path / "a"), str(tmp_path / "b"), "--rtol", "1e-4")
    assert loose.returncode == 1
    assert "3 of 3 elements differ" in loose.stdout


def test_no_verify_salvages_a_damaged_checkpoint(tmp_path: Path) -> None:
    values = np.arange(32, dtype=np.float64) + 0.25
    prefix = tmp_path / "bad"
    anyckpt.sync.save(prefix, {"w": values, "ok": np.ones(3)})
    flip_byte(tmp_path / "bad.data-00000-of-00001", values[5:6].tobytes())
    assert run("inspect", str(prefix), "--values").returncode == 1
    assert run("inspect", str(prefix), "--values", "--no-verify").returncode == 0
    assert run("convert", str(prefix), str(tmp_path / "saved")).returncode == 1
    salvaged = run("convert", str(prefix), str(tmp_path / "saved"), "--no-verify")
    assert salvaged.returncode == 0
    assert run("verify", str(tmp_path / "saved")).returncode == 0
    assert run("diff", str(prefix), str(tmp_path / "saved")).returncode == 1
    same = run("diff", str(prefix), str(tmp_path / "saved"), "--no-verify")
    assert same.returncode == 0


@given(
    width=st.integers(min_value=12, max_value=240),
    total=st.one_of(st.none(), st.integers(min_value=1, max_value=1 << 40)),
    fraction=st.floats(min_value=0, max_value=1),
)
def test_the_bar_leaves_out_whole_parts(width: int, total: int | None, fraction: float) -> None:
    bar = Progress("writing", total, enabled=False)
    bar.done = int((total or 1 << 30) * fraction)
    bar.note = "16.0 MiB of data as zstd"
    line = bar.render(width)
    assert display_width(line) <= max(width - 1, 10)
    assert line.startswith("writing")
    assert (bar.note in line) or ("zstd" not in line and "data" not in line), line
    if width >= 160:  # room for everything
        assert bar.note in line
