"""anyckpt.manager.capture: the copy an async save makes before ``save()`` returns. Whatever path
it takes (many small arrays of one dtype and shape copied as one block, a per-array loop, large
arrays on worker threads), the result is a private, C-contiguous copy of every array, in the
caller's order, that later changes to the caller's arrays never reach."""

from __future__ import annotations

from typing import Any

import anyio
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import anyckpt
from anyckpt.manager.capture import THREADED_COPY_BYTES, capture

DTYPES = [np.float32, np.float64, np.int8, np.int64, np.uint16, np.bool_, np.complex64]
DTYPES.append(ml_dtypes.bfloat16)


def check_capture(tensors: dict[str, Any]) -> dict[str, np.ndarray]:
    """Capture ``tensors``, check the copy, then scribble over the originals and check again."""
    expected = {k: np.array(v, copy=True) for k, v in tensors.items()}
    out = anyio.run(capture, tensors)
    assert list(out) == list(tensors)
    for key, value in tensors.items():
        copy = out[key]
        assert type(copy) is type(value)
        assert copy.dtype == value.dtype
        assert copy.shape == value.shape
        assert copy.flags.c_contiguous
        if value.dtype != object:
            assert not np.shares_memory(copy, value)
        assert np.array_equal(copy, expected[key])
        if isinstance(value, anyckpt.Partitioned):
            assert isinstance(copy, anyckpt.Partitioned)
            assert copy.partitions == value.partitions
    for value in tensors.values():  # the caller reuses its buffers
        if value.dtype != object and value.flags.writeable:
            value.fill(True if value.dtype == np.bool_ else 99)
    for key, copy in out.items():
        assert np.array_equal(copy, expected[key]), key
    return out


@st.composite
def small_states(draw: st.DrawFn) -> dict[str, Any]:
    """Mostly many arrays of one dtype and shape (the block path), sometimes with one odd
    array out: another shape or dtype, a strided view, a scalar, a subclass, strings."""
    n = draw(st.integers(0, 40))
    dtype = np.dtype(draw(st.sampled_from(DTYPES)))
    shape = draw(st.sampled_from([(4,), (2, 3), (1,), (0,), (3, 0), (2, 1, 2)]))
    size = int(np.prod(shape))
    state: dict[str, Any] = {
        f"layer_{i:03d}/w": (np.arange(size, dtype=np.float64).reshape(shape) + i).astype(dtype)
        for i in range(n)
    }
    odd = draw(
        st.sampled_from(
            [None, "shape", "dtype", "strided", "fortran", "scalar", "subclass", "strings", "ro"]
        )
    )
    at = f"layer_{draw(st.integers(0, max(n - 1, 0))):03d}/w"
    if odd == "shape":
        state[at] = np.ones(size + 1, dtype=dtype)
    elif odd == "dtype":
        state[at] = np.ones(shape, dtype=np.float64 if dtype != np.float64 else np.float32)
    elif odd == "strided" and size:
        state[at] = np.ones((*shape[:-1], shape[-1] * 2), dtype=dtype)[..., ::2]
    elif odd == "fortran" and len(shape) >= 2:
        state[at] = np.asfortranarray(np.arange(size).reshape(shape).astype(dtype))
    elif odd == "scalar":
        state[at] = np.array(7, dtype=dtype)
    elif odd == "subclass":
        state[at] = anyckpt.Partitioned.split(np.arange(6.0).reshape(3, 2), 3, axis=0)
    elif odd == "strings":
        state[at] = np.array([b"a", b"bc"], dtype=object)
    elif odd == "ro" and n:
        state[at] = state[at].copy()
        state[at].flags.writeable = False
    return state


@settings(max_examples=300, deadline=None)
@given(state=small_states())
def test_capture_is_a_private_copy_in_order(state: dict[str, Any]) -> None:
    check_capture(state)


def test_many_small_arrays_of_one_shape_are_one_block() -> None:
    """10,000 small float32 arrays (the many_small benchmark's shape) are copied into one fresh
    buffer: the copies are its rows, so they share one base, and none shares the originals'
    memory."""
    state = {f"layer_{i:03d}/kernel": np.full(256, i, dtype=np.float32) for i in range(2000)}
    out = check_capture(state)
    bases = {id(np.asarray(v).base) for v in out.values()}
    assert len(bases) == 1
    assert all(v.flags.writeable and v.flags.aligned for v in out.values())


def test_large_arrays_are_copied_on_threads_with_small_ones_in_order() -> None:
    n = THREADED_COPY_BYTES // 4
    state = {
        "small/a": np.arange(10, dtype=np.float32),
        "big/a": np.arange(n, dtype=np.float32),
        "small/b": np.arange(10, dtype=np.float32),
        "big/b": np.arange(n + 3, dtype=np.float32),
        "big/c": np.arange(2 * n, dtype=np.float32)[::2],  # strided
        "text": np.array([b"x" * 10] * (n // 8 + 1), dtype=object),
    }
    check_capture(state)
    uniform_big = {f"w{i}": np.full(n, i, dtype=np.float32) for i in range(3)}
    check_capture(uniform_big)


@pytest.mark.parametrize("n", [0, 1, 2])
def test_tiny_states(n: int) -> None:
    check_capture({f"w{i}": np.ones(3) for i in range(n)})


def test_odd_arrays_far_down_a_uniform_state_are_noticed() -> None:
    """Past the first few entries, a subclass, another dtype or shape, a strided view or a
    scalar among thousands of like arrays still gets a faithful copy."""
    for odd in (
        anyckpt.Partitioned.split(np.arange(6.0).reshape(3, 2), 3, axis=0),
        np.ones((3, 2), dtype=np.float32),
        np.ones((2, 3)),
        np.ones((3, 4))[:, ::2],
        np.ones((2, 3)).T,
        np.array(1.0),
    ):
        state: dict[str, Any] = {f"w{i}": np.full((3, 2), i, dtype=np.float64) for i in range(3000)}
        state["w2500"] = odd
        check_capture(state)
