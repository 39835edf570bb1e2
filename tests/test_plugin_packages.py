"""Plugins as their users get them: real distributions (a ``.dist-info`` with an
``entry_points.txt`` on ``sys.path``) in a fresh interpreter, through the library and the CLI.

* A broken plugin (an entry point with a typo, a class lacking a member, a sync ``detect``)
  never breaks another format: one warning names it, only asking for it by name raises.
* ``anyckpt ls`` never calls present files missing.
* A plugin's own bug is blamed on the plugin and its package (exit 5), not on anyckpt.
* The guide's example plugin (docs/plugins.md), installed as a package, works with ``save``,
  ``load``, ``open``, the manager and the CLI.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "plugins.md"


def guide_plugin() -> str:
    """The guide's plugin module: its python block starting ``# toy_format.py``."""
    text = GUIDE.read_text(encoding="utf-8")
    match = re.search(r"```python\n(# toy_format\.py.*?)```", text, re.S)
    assert match, "docs/plugins.md has no '# toy_format.py' block"
    return match.group(1)


def install(
    site: Path, dist: str, version: str, modules: dict[str, str], eps: dict[str, str]
) -> None:
    """A distribution as pip leaves it: modules plus ``NAME-VERSION.dist-info``."""
    site.mkdir(exist_ok=True)
    for name, code in modules.items():
        (site / f"{name}.py").write_text(code, encoding="utf-8")
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = "".join(f"{name} = {value}\n" for name, value in eps.items())
    (info / "entry_points.txt").write_text(f"[anyckpt.formats]\n{lines}")
    (info / "RECORD").write_text("")


def env_for(site: Path) -> dict[str, str]:
    paths = [str(site), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def python(site: Path, code: str, cwd: Path) -> dict[str, Any]:
    """Run ``code`` in a fresh interpreter with ``site`` installed; its last stdout line is
    JSON."""
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env_for(site),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def cli(site: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "anyckpt", "--no-progress", *args],
        env=env_for(site),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


TOY = "toy_format:ToyFormat"

NO_FILES = """
from toy_format import ToyFormat

class Incomplete:
    name = "incomplete"
    write, open, detect = ToyFormat.write, ToyFormat.open, ToyFormat.detect
"""

SYNC_DETECT = """
from toy_format import ToyFormat

class SyncDetect(ToyFormat):
    name = "syncdetect"

    def detect(self, storage, prefix):
        return False
"""

BUGGY = """
from toy_format import ToyFormat

class Buggy(ToyFormat):
    name = "buggy"

    async def write(self, storage, prefix, tensors, *, durable=True, options=None):
        return {}["a bug in the plugin"]
"""


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """The guide's plugin installed, plus three broken ones and a buggy one."""
    site = tmp_path / "site"
    install(site, "toy-format", "1.0", {"toy_format": guide_plugin()}, {"toy": TOY})
    install(site, "typo-format", "0.1", {}, {"typo": "toy_formt:ToyFormat"})
    install(
        site,
        "incomplete-format",
        "0.2",
        {"incomplete": NO_FILES},
        {"incomplete": "incomplete:Incomplete"},
    )
    install(
        site,
        "sync-format",
        "0.3",
        {"syncdetect": SYNC_DETECT},
        {"syncdetect": "syncdetect:SyncDetect"},
    )
    install(site, "buggy-format", "2.1", {"buggy": BUGGY}, {"buggy": "buggy:Buggy"})
    return site


BROKEN = {
    "typo": "failed to load: ModuleNotFoundError",
    "incomplete": "does not implement CheckpointFormat: it has no 'files' member",
    "syncdetect": "does not implement CheckpointFormat: 'detect' is not a coroutine function",
}


def test_broken_plugins_never_break_other_formats(site: Path, tmp_path: Path) -> None:
    result = python(
        site,
        """
        import json, os, warnings
        import numpy as np
        import anyckpt, anyckpt.sync
        from anyckpt.errors import PluginWarning

        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            w = {"w": np.arange(4.0)}
            anyckpt.sync.save("v2/ckpt-1", w)
            loaded = anyckpt.sync.load("v2/ckpt-1")["w"].tolist()
            anyckpt.sync.save("toy/ckpt-1", w, format="toy")
            toy = anyckpt.sync.load("toy/ckpt-1")["w"].tolist()
            asked = {}
            for name in ("typo", "incomplete", "syncdetect"):
                try:
                    anyckpt.get_format(name)
                except anyckpt.UnsupportedFormatError as exc:
                    asked[name] = str(exc)
            # A V2 manager's retention with the broken plugins installed.
            with anyckpt.sync.CheckpointManager("run", max_to_keep=2, durable=False) as m:
                for step in (1, 2, 3):
                    m.save({"w": np.full(2, float(step))}, step).wait()
            left = sorted(n for n in os.listdir("run") if n.endswith(".index"))
        warned = [str(x.message) for x in seen if issubclass(x.category, PluginWarning)]
        print(json.dumps({"loaded": loaded, "toy": toy, "asked": asked, "warned": warned,
                          "left": left, "available": anyckpt.available_formats()}))
        """,
        tmp_path,
    )
    assert result["loaded"] == [0.0, 1.0, 2.0, 3.0]
    assert result["toy"] == [0.0, 1.0, 2.0, 3.0]
    assert result["left"] == ["ckpt-2.index", "ckpt-3.index"]  # retention ran: 3 saved, 2 kept
    assert "toy" in result["available"]
    assert len(result["warned"]) == len(BROKEN)  # one warning per broken plugin
    for name, why in BROKEN.items():
        assert name not in result["available"]
        assert sum(f"format plugin {name!r}" in w for w in result["warned"]) == 1
        assert why in result["asked"][name]  # asking for it by name raises, saying why
    assert "package typo-format 0.1" in result["asked"]["typo"]

    # The CLI: a V2 checkpoint inspects fine, each broken plugin warned about once, one line.
    out = cli(site, "inspect", "v2/ckpt-1", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for name in BROKEN:
        assert out.stderr.count(f"anyckpt: warning: format plugin {name!r}") == 1, out.stderr
    out = cli(site, "convert", "v2/ckpt-1", "out/c", "--format", "typo", cwd=tmp_path)
    assert out.returncode == 4
    assert "format plugin 'typo'" in out.stderr.splitlines()[-1]


def test_ls_never_calls_present_files_missing(site: Path, tmp_path: Path) -> None:
    python(
        site,
        """
        import json
        import numpy as np
        import anyckpt.sync
        with anyckpt.sync.CheckpointManager("run", format="toy", durable=False) as m:
            for step in (4, 5):
                m.save({"w": np.full(3, float(step))}, step).wait()
        print("{}")
        """,
        tmp_path,
    )
    # With the toy plugin working (and broken ones installed), they are listed.
    out = cli(site, "ls", "--json", "run", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    listing = json.loads(out.stdout)
    assert [c["name"] for c in listing["checkpoints"]] == ["ckpt-4", "ckpt-5"]
    assert listing["missing"] == []

    # With the toy plugin itself broken: present, unreadable, said why; never "missing".
    broken = tmp_path / "broken-site"
    install(broken, "toy-format", "1.0", {}, {"toy": "toy_formt:ToyFormat"})
    out = cli(broken, "ls", "run", cwd=tmp_path)
    assert out.returncode == 4, out.stdout + out.stderr
    assert "missing" not in out.stdout
    assert "unreadable: the state file names 'ckpt-5'" in out.stdout
    assert "format plugin 'toy'" in out.stdout
    assert "ckpt-5.toy" in out.stdout
    out = cli(broken, "ls", "--json", "run", cwd=tmp_path)
    assert out.returncode == 4
    listing = json.loads(out.stdout)
    assert listing["missing"] == []
    assert [u["name"] for u in listing["unreadable"]] == ["ckpt-4", "ckpt-5"]

    # No plugin at all for them: still not "missing".
    out = cli(tmp_path / "empty-site", "ls", "run", cwd=tmp_path)
    assert out.returncode == 4
    assert "missing" not in out.stdout
    assert "no installed format recognises them" in out.stdout


def test_a_plugins_bug_is_blamed_on_the_plugin(site: Path, tmp_path: Path) -> None:
    python(
        site,
        """
        import numpy as np, anyckpt.sync
        anyckpt.sync.save("v2/ckpt-1", {"w": np.arange(3.0)})
        print("{}")
        """,
        tmp_path,
    )
    out = cli(site, "convert", "v2/ckpt-1", "out/c", "--format", "buggy", cwd=tmp_path)
    assert out.returncode == 5, out.stderr
    message = out.stderr.strip().splitlines()[-1]
    assert "internal error" not in message
    assert "format plugin 'buggy' (package buggy-format 2.1) failed: KeyError" in message
    assert "report it to the plugin's authors" in message


def test_the_guides_plugin_installed_as_a_package(site: Path, tmp_path: Path) -> None:
    result = python(
        site,
        """
        import json, os
        import anyio
        import numpy as np
        import anyckpt

        async def main():
            w = {"w": np.arange(12, dtype=np.float32).reshape(4, 3), "b": np.ones(2, np.int64)}
            written = await anyckpt.save("deep/new/dir/model", w, format="toy")  # no makedirs
            async with await anyckpt.open("deep/new/dir/model") as reader:  # async with works
                rows = (await reader.read("w", (slice(1, 3),))).tolist()
                fmt = type(reader).__name__
            async with anyckpt.CheckpointManager("run", max_to_keep=2, format="toy") as m:
                for step in (1, 2, 3):
                    await (await m.save({"w": np.full(2, float(step))}, step))
                restored = (await m.restore())["w"].tolist()
            return {"written": [os.path.basename(p) for p in written], "rows": rows,
                    "reader": fmt, "restored": restored, "left": sorted(os.listdir("run"))}

        print(json.dumps(anyio.run(main)))
        """,
        tmp_path,
    )
    assert result["written"] == ["model.toy"]
    assert result["rows"] == [[3.0, 4.0, 5.0], [6.0, 7.0, 8.0]]
    assert result["reader"] == "ToyReader"
    assert result["restored"] == [3.0, 3.0]
    assert result["left"] == ["checkpoint", "ckpt-2.toy", "ckpt-3.toy"]

    out = cli(site, "ls", "--json", "run", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    listing = json.loads(out.stdout)
    assert [(c["name"], c["format"]) for c in listing["checkpoints"]] == [
        ("ckpt-2", "toy"),
        ("ckpt-3", "toy"),
    ]
    assert cli(site, "verify", "run", cwd=tmp_path).returncode == 0
    out = cli(site, "inspect", "--json", "run/ckpt-3", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["format"] == "toy"
    out = cli(site, "convert", "run/ckpt-3", "tf/ckpt-3", "--format", "v2", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    out = cli(site, "convert", "tf/ckpt-3", "back/ckpt-3", "--format", "toy", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    out = cli(site, "diff", "run/ckpt-3", "back/ckpt-3", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
