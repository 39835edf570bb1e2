"""A one-file V2 save builds its index while the data is written (a second core) only when
it is small (``MANY_TENSORS``); a larger one builds and writes it a range at a time
after the data. Either way the files are the same bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import anyckpt
from anyckpt.formats import v2


def _state() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(16)
    state: dict[str, np.ndarray] = {}
    for i in range(600):  # tiny and ~1 KiB tensors and strings: entries final before writing
        state[f"layer_{i // 10:03d}/w{i % 10}"] = rng.standard_normal(i % 3 * 128 + 1).astype(
            np.float32
        )
    state["strings"] = np.array([b"a", b"bc"], dtype=object)
    return state


@pytest.mark.parametrize("limit", [0, 600, 601, 10_000])
def test_the_index_is_the_same_built_early_or_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: int
) -> None:
    state = _state()
    anyckpt.sync.save(tmp_path / "early" / "ckpt", state)  # the default: 601 <= 65,536

    built_early: list[int] = []
    original = v2.build_index

    def spy(*args: object, **kwargs: object) -> bytes:
        built_early.append(1)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(v2, "build_index", spy)
    monkeypatch.setattr(v2, "MANY_TENSORS", limit)
    anyckpt.sync.save(tmp_path / "after" / "ckpt", state)
    assert bool(built_early) == (len(state) <= limit)
    for name in ("ckpt.index", "ckpt.data-00000-of-00001"):
        assert (tmp_path / "after" / name).read_bytes() == (tmp_path / "early" / name).read_bytes()
    restored = anyckpt.sync.load(tmp_path / "after" / "ckpt")
    assert list(restored) == sorted(state)
    np.testing.assert_array_equal(restored["layer_059/w8"], state["layer_059/w8"])
