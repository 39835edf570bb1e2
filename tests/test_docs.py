"""Every ```python block in README.md and docs/ runs.

The blocks of one page run in order, in one namespace, in a fresh temporary working directory,
like a reader following along. A block may be marked on the line before it:

* ``<!-- docs-test: skip REASON -->``: not run; REASON is reported by pytest (and should be
  said in the page's text too);
* ``<!-- docs-test: tensorflow -->``: run by the Python of the TensorFlow environment
  (``$ANYCKPT_TF_PYTHON``, set by ``make test``) in a subprocess, in the same directory;
  skipped, with that reason, when there is none, and so is the rest of its page (which may
  read what it wrote).
* ``<!-- docs-test: torch -->``: needs real PyTorch (the ``dist`` extra, which ``make test``
  installs); skipped, with that reason, without it.

When PyTorch or JAX is not installed, the blocks importing them run against the small NumPy
stand-ins below, which provide exactly the calls the docs use (the pages say so).

**Printed output is checked.** A ``print(...)`` statement's comment states what it prints: at
the end of its line (``print(x)  # [0. 1. 2.]``), or on the comment lines right below it (for
long output). ``...`` in it stands for any text (as doctest's ELLIPSIS), e.g. the reader's
temporary directory; anything else must be printed exactly (surrounding whitespace aside). A
remark that is not output goes on a line of its own, above the print.
"""

from __future__ import annotations

import ast
import builtins
import io
import os
import re
import subprocess
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[^\n]*$")
MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<what>\w+)\s*(?P<reason>.*?)\s*-->\s*$")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    code: str
    marker: str | None
    reason: str


def blocks(page: Path) -> Iterator[Block]:
    lines = page.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, lang = match["indent"], match["lang"]
        body: list[str] = []
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j])
            j += 1
        if lang == "python":
            k = i - 1
            while k >= 0 and not lines[k].strip():
                k -= 1
            marker = MARKER.match(lines[k]) if k >= 0 else None
            yield Block(
                page,
                i + 1,
                "\n".join(body) + "\n",
                marker["what"] if marker else None,
                marker["reason"] if marker else "",
            )
        i = j + 1


def _ids(page: Path) -> str:
    return str(page.relative_to(ROOT))


# -- stand-ins for torch and jax -------------------------------------------------------------


class _Tensor:
    """A CPU tensor: a NumPy array with the few torch.Tensor methods the docs call."""

    def __init__(self, array: Any) -> None:
        self._array = np.asarray(array)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return self._array if dtype is None else self._array.astype(dtype)

    def detach(self) -> _Tensor:
        return self

    def cpu(self) -> _Tensor:
        return self

    def numpy(self) -> np.ndarray:
        return self._array

    @property
    def shape(self) -> tuple[int, ...]:
        return self._array.shape


class _Linear:
    def __init__(self, n_in: int, n_out: int) -> None:
        rng = np.random.default_rng(n_in * 1000 + n_out)
        self._params = {
            "weight": _Tensor(rng.standard_normal((n_out, n_in)).astype(np.float32)),
            "bias": _Tensor(np.zeros(n_out, np.float32)),
        }

    def state_dict(self) -> dict[str, _Tensor]:
        return dict(self._params)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert set(state) == set(self._params), (set(state), set(self._params))
        for key, value in state.items():
            assert np.shape(value) == self._params[key].shape
            self._params[key] = _Tensor(np.array(value))


def _torch_standin() -> types.ModuleType:
    torch = types.ModuleType("torch")
    nn = types.ModuleType("torch.nn")
    nn.Linear = _Linear  # type: ignore[attr-defined]
    torch.nn = nn  # type: ignore[attr-defined]
    torch.Tensor = _Tensor  # type: ignore[attr-defined]
    torch.from_numpy = _Tensor  # type: ignore[attr-defined]
    torch.equal = lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b)))  # type: ignore[attr-defined]
    return torch


def _tree_map(fn: Any, tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_tree_map(fn, v) for v in tree)
    return fn(tree)


def _jax_standin() -> types.ModuleType:
    jax = types.ModuleType("jax")
    tree_util = types.ModuleType("jax.tree_util")
    tree_util.tree_map = _tree_map  # type: ignore[attr-defined]
    jax.tree_util = tree_util  # type: ignore[attr-defined]
    jax.numpy = np  # type: ignore[attr-defined]
    jax.device_get = lambda tree: _tree_map(np.asarray, tree)  # type: ignore[attr-defined]
    return jax


def _missing(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return True
    return False


#: Whether real PyTorch is installed (before any stand-in takes its place).
HAVE_TORCH = not _missing("torch")


@pytest.fixture
def standins(monkeypatch: pytest.MonkeyPatch) -> None:
    if _missing("torch"):
        torch = _torch_standin()
        monkeypatch.setitem(sys.modules, "torch", torch)
        monkeypatch.setitem(sys.modules, "torch.nn", torch.nn)
    if _missing("jax"):
        jax = _jax_standin()
        monkeypatch.setitem(sys.modules, "jax", jax)
        monkeypatch.setitem(sys.modules, "jax.numpy", np)
        monkeypatch.setitem(sys.modules, "jax.tree_util", jax.tree_util)


# -- the tests -------------------------------------------------------------------------------


def test_there_are_pages_with_samples() -> None:
    names = {p.name for p in PAGES}
    assert {"README.md", "index.md", "getting-started.md", "manager.md", "cli.md"} <= names
    assert sum(1 for page in PAGES for _ in blocks(page)) >= 20


def _tf_python() -> str | None:
    tf_python = os.environ.get("ANYCKPT_TF_PYTHON")
    return tf_python if tf_python and Path(tf_python).exists() else None


def _not_run() -> list[tuple[str, str]]:
    """(where, why) of every sample that does not run here."""
    found = []
    for page in PAGES:
        after_tf = False
        for block in blocks(page):
            where = f"{page.relative_to(ROOT)}:{block.line}"
            if block.marker == "skip":
                found.append((where, block.reason))
            elif after_tf:
                found.append((where, "follows a TensorFlow sample ($ANYCKPT_TF_PYTHON is not set)"))
            elif block.marker == "tensorflow" and _tf_python() is None:
                found.append((where, "needs TensorFlow ($ANYCKPT_TF_PYTHON is not set)"))
                after_tf = True
            elif block.marker == "torch" and not HAVE_TORCH:
                found.append((where, "needs PyTorch (the dist extra)"))
    return found


@pytest.mark.parametrize(("where", "reason"), _not_run() or [("-", "")], ids=lambda v: v)
def test_samples_not_run(where: str, reason: str) -> None:
    """One skipped item per sample that is not run, with its reason, in pytest's summary."""
    if where == "-":
        return
    assert reason, f"{where}: a skipped sample needs a reason"
    pytest.skip(f"{where}: {reason}")


@pytest.mark.parametrize("page", [p for p in PAGES if any(blocks(p))], ids=_ids)
@pytest.mark.usefixtures("standins")
def test_page_samples_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    found = list(blocks(page))
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "__docs__"}
    checks = OutputChecks()
    namespace["print"] = checks.print
    for block in found:
        where = f"{block.page.relative_to(ROOT)}:{block.line}"
        if block.marker == "skip":
            continue  # reported by test_samples_not_run
        if block.marker == "tensorflow":
            tf_python = _tf_python()
            if tf_python is None:
                break  # the rest may read its files; all reported by test_samples_not_run
            result = subprocess.run(
                [tf_python, "-c", block.code],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=240,
                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
                check=False,
            )
            assert result.returncode == 0, f"{where} failed under TensorFlow:\n{result.stderr}"
            continue
        if block.marker == "torch" and not HAVE_TORCH:
            continue  # reported by test_samples_not_run
        assert block.marker in (None, "torch"), f"{where}: unknown marker {block.marker!r}"
        checks.expect(where, block)
        try:
            exec(compile(block.code, where, "exec"), namespace)
        except Exception as exc:
            raise AssertionError(f"the sample at {where} failed: {exc!r}") from exc
    checks.assert_all_seen()


# -- printed output, as the samples' comments state it ---------------------------------------

COMMENT = re.compile(r"^\s*#\s?(?P<text>.*)$")


def stated_outputs(code: str) -> dict[int, str]:
    """{line of a print statement: the output its comment states} (see the module's doc)."""
    lines = code.splitlines()
    found: dict[int, str] = {}
    for node in ast.walk(ast.parse(code)):
        if not (
            isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Name)
            and node.value.func.id == "print"
        ):
            continue
        last = lines[node.end_lineno - 1]  # type: ignore[operator]
        tail = last[node.end_col_offset :].strip()
        if tail.startswith("#"):
            found[node.lineno] = tail[1:].strip()
            continue
        below = []
        for line in lines[node.end_lineno :]:  # type: ignore[misc]
            match = COMMENT.match(line)
            if not match:
                break
            below.append(match["text"])
        if below:
            found[node.lineno] = "\n".join(below).strip()
    return found


def output_matches(printed: str, stated: str) -> bool:
    """``stated``, where ``...`` is any text, is all of ``printed`` (ends' whitespace aside)."""
    pattern = ".*?".join(re.escape(part) for part in stated.strip().split("..."))
    return re.fullmatch(pattern, printed.strip(), flags=re.DOTALL) is not None


class OutputChecks:
    """A ``print`` for the samples that compares each stated output with what is printed."""

    def __init__(self) -> None:
        self._stated: dict[tuple[str, int], str] = {}
        self._seen: set[tuple[str, int]] = set()

    def expect(self, where: str, block: Block) -> None:
        for line, text in stated_outputs(block.code).items():
            self._stated[(where, line)] = text

    def print(self, *args: Any, **kwargs: Any) -> None:
        buffer = io.StringIO()
        builtins.print(*args, **{**kwargs, "file": buffer})
        printed = buffer.getvalue()
        builtins.print(printed, end="", file=kwargs.get("file"))
        caller = sys._getframe(1)
        at = (caller.f_code.co_filename, caller.f_lineno)
        stated = self._stated.get(at)
        if stated is None:
            return
        self._seen.add(at)
        page, _, first = at[0].rpartition(":")
        line = int(first) + at[1]  # the block's code starts on the line after the fence
        assert output_matches(printed, stated), (
            f"{page}:{line} prints {printed.strip()!r}, its comment says {stated!r}"
        )

    def assert_all_seen(self) -> None:
        missing = sorted(set(self._stated) - self._seen)
        assert not missing, f"stated outputs never printed (the print did not run): {missing}"


@pytest.mark.parametrize(
    ("printed", "stated", "ok"),
    [
        ("[0. 1. 2.]\n", "[0. 1. 2.]", True),
        ("[0. 1. 2.]\n", "[0. 1. 3.]", False),
        ("['/tmp/x/ckpt/m.index']\n", "['.../ckpt/m.index']", True),
        ("['/tmp/x/ckpt/m.index']\n", "['.../ckpt/n.index']", False),
        ("a\nb\n", "a\nb", True),
        ("a\nb\n", "a", False),
        ("the 3 newest", "('a', 'b', 'c')", False),
    ],
)
def test_output_matching(printed: str, stated: str, ok: bool) -> None:
    assert output_matches(printed, stated) is ok


def test_stated_outputs_are_found() -> None:
    code = (
        "x = 1\n"
        "print(x)  # 1\n"
        "print(\n    x,\n)  # 1\n"
        "print([x] * 2)\n"
        "# [1,\n"
        "#  1]\n"
        "x = 1\n"
        "# a remark above a print without an output comment\n"
        "print(x)\n"
        "y = 2  # not a print\n"
    )
    assert stated_outputs(code) == {2: "1", 3: "1", 6: "[1,\n 1]"}  # not line 11


# -- docs/architecture.md: dependencies point one way ----------------------------------------

LAYER_LINE = re.compile(r"^(?P<mods>anyckpt[\w.]*(?:, anyckpt[\w.]*)*)(?:\s{2,}.*)?$")


def _layers() -> list[list[str]]:
    """The layer table of docs/architecture.md, top first."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    block = text.split("## Layers", 1)[1].split("```text", 1)[1].split("```", 1)[0]
    layers = []
    for line in block.strip().splitlines():
        match = LAYER_LINE.match(line.strip())
        assert match, f"docs/architecture.md: cannot read layer line {line!r}"
        layers.append(match["mods"].split(", "))
    return layers


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT / "src").with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, module: str) -> set[str]:
    import ast

    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "anyckpt")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target.split(".")[0] != "anyckpt":
                continue
            if node.module is None:  # from . import api: submodules, or names of the package
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    is_module = (
                        any(
                            (ROOT / "src" / Path(*sub.split("."))).with_suffix(s).exists()
                            for s in (".py",)
                        )
                        or (ROOT / "src" / Path(*sub.split("."))).is_dir()
                    )
                    if alias.name != "__version__":  # a constant, readable from anywhere
                        found.add(sub if is_module else target)
            else:
                found.add(target)
    return found


def test_architecture_layers_point_one_way() -> None:
    layers = _layers()

    def layer_of(module: str) -> int | None:
        best: tuple[int, int] | None = None  # (prefix length, layer)
        for index, mods in enumerate(layers):
            for name in mods:
                matches = module == name or module.startswith(name + ".")
                if matches and (best is None or len(name) > best[0]):
                    best = (len(name), index)
        return None if best is None else best[1]

    problems = []
    for path in sorted((ROOT / "src" / "anyckpt").rglob("*.py")):
        module = _module_name(path)
        mine = layer_of(module)
        if mine is None:
            problems.append(f"{module} is in no layer of docs/architecture.md")
            continue
        for target in sorted(_imports(path, module)):
            theirs = layer_of(target)
            if theirs is not None and theirs < mine:
                problems.append(f"{module} imports {target}, a layer above it")
    assert not problems, "\n".join(problems)
