"""anyckpt.tensors: flattening and normalising user state. The bulk fast paths of ``flatten``
and ``prepare`` (plain dicts of str names to plain numeric arrays) must give exactly what the
per-entry code gives, and the same errors, for any state: checked against a reference copy of
that per-entry code, on hypothesis-generated states."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import anyio
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import anyckpt
from anyckpt.tensors import as_tensor, flatten, normalize_key, prepare


def reference_flatten(state: Mapping[Any, Any], *, separator: str = "/") -> dict[str, Any]:
    """The per-entry flatten (as it was before the bulk path)."""
    out: dict[str, Any] = {}

    def visit(prefix: str, node: Mapping[Any, Any]) -> None:
        for raw_key, value in node.items():
            try:
                key = normalize_key(raw_key)
            except (TypeError, ValueError) as exc:
                where = f" (in {prefix!r})" if prefix else ""
                raise type(exc)(f"{exc}{where}") from None
            name = f"{prefix}{separator}{key}" if prefix else key
            if isinstance(value, Mapping):
                visit(name, value)
            elif name in out:
                raise ValueError(f"two entries flatten to the same name {name!r}")
            else:
                out[name] = value

    visit("", state)
    return out


def reference_prepare(state: Mapping[Any, Any]) -> dict[str, np.ndarray]:
    return {key: _reference_tensor(key, value) for key, value in reference_flatten(state).items()}


def _reference_tensor(key: str, value: Any) -> np.ndarray:
    try:
        return as_tensor(value)
    except TypeError as exc:
        raise TypeError(f"tensor {key!r}: {exc}") from exc


def outcome(fn: Any, state: Any) -> tuple[str, Any]:
    try:
        return "ok", fn(state)
    except Exception as exc:
        return "error", (type(exc), str(exc))


def assert_same(got: tuple[str, Any], want: tuple[str, Any], *, identical: bool) -> None:
    assert got[0] == want[0], (got, want)
    if got[0] == "error":
        assert got[1] == want[1]
        return
    assert list(got[1]) == list(want[1])  # same names, same order
    for key, value in want[1].items():
        mine = got[1][key]
        if identical:  # flatten leaves values as they are
            assert mine is value
        else:
            assert type(mine) is type(value)
            assert mine.dtype == value.dtype
            assert mine.shape == value.shape
            assert mine.tolist() == value.tolist()


ARRAY_DTYPES = [np.float32, np.float64, np.int8, np.int64, np.uint16, np.bool_, ml_dtypes.bfloat16]
KEYS = st.one_of(
    st.sampled_from(["a", "b", "a/b", "b/a", "", "w"]),
    st.sampled_from([b"a", b"\xff", 3, None, 2.5]),  # bytes and int names, names refused
    st.text(min_size=0, max_size=3),
)


@st.composite
def leaves(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["array"] * 6 + ["scalar", "list", "str", "bytes", "odd"]))
    if kind == "array":
        dtype = draw(st.sampled_from(ARRAY_DTYPES))
        shape = draw(st.sampled_from([(3,), (2, 2), (), (0,)]))
        array = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape).astype(dtype)
        return array.T if draw(st.booleans()) else array  # sometimes not C-contiguous
    if kind == "scalar":
        return draw(st.sampled_from([1, 2.5, True, np.float32(3)]))
    if kind == "list":
        return [1.0, 2.0]
    if kind == "str":
        return "text"
    if kind == "bytes":
        return np.array([b"a\0", b"b"], dtype=object)
    return draw(
        st.sampled_from(
            [
                np.zeros(2, dtype=np.complex64),  # no TensorFlow name? (it has: complex64)
                np.zeros(2, dtype=np.float16).astype(">f2"),  # big-endian
                np.zeros(2, dtype="datetime64[s]"),  # refused
                np.array(["x", "yz"]),  # NumPy text
                anyckpt.Partitioned.split(np.arange(6.0).reshape(3, 2), 3, axis=0),
            ]
        )
    )


def states() -> st.SearchStrategy[Any]:
    node = st.recursive(
        leaves(),
        lambda children: st.one_of(
            st.dictionaries(KEYS, children, max_size=5),
            st.dictionaries(KEYS, children, max_size=3).map(OrderedDict),
        ),
        max_leaves=12,
    )
    return st.dictionaries(KEYS, node, max_size=6)


@settings(max_examples=400, deadline=None)
@given(state=states())
def test_flatten_and_prepare_match_the_per_entry_code(state: dict[Any, Any]) -> None:
    assert_same(outcome(flatten, state), outcome(reference_flatten, state), identical=True)
    assert_same(outcome(prepare, state), outcome(reference_prepare, state), identical=False)


@settings(max_examples=200, deadline=None)
@given(
    names=st.lists(st.sampled_from(["a", "b", "c", "a/b", "b/c", "x/y/z"]), max_size=6),
    nest=st.sampled_from(["a", "b", "x/y", "x"]),
)
def test_plain_states_match_including_collisions(names: list[str], nest: str) -> None:
    """The states the bulk path takes (dicts of str to plain arrays), nested and flat, with
    names that collide after flattening: same result, same error."""
    arrays = {name: np.full(2, i, dtype=np.float32) for i, name in enumerate(names)}
    for state in (
        arrays,
        {nest: arrays},
        {**arrays, nest: dict(arrays)},
        {nest: dict(arrays), **arrays},
        {"p": arrays, "q": {"r": arrays}},
    ):
        assert_same(outcome(flatten, state), outcome(reference_flatten, state), identical=True)
        assert_same(outcome(prepare, state), outcome(reference_prepare, state), identical=False)


def test_plain_state_is_returned_as_a_new_dict_of_the_same_arrays() -> None:
    state = {f"layer_{i}/kernel": np.ones(4, dtype=np.float32) for i in range(50)}
    prepared = prepare(state)
    assert prepared is not state
    assert list(prepared) == list(state)
    assert all(prepared[k] is state[k] for k in state)
    nested = {"model": state, "step": np.int64(3)}
    flat = prepare(nested)
    assert list(flat) == [f"model/{k}" for k in state] + ["step"]
    assert flat["step"].dtype == np.int64
    assert flat["step"].shape == ()


@pytest.mark.parametrize(
    ("state", "error", "message"),
    [
        ({"": np.zeros(1)}, ValueError, "empty tensor name"),
        ({"a": {"": np.zeros(1)}}, ValueError, "empty tensor name"),
        ({1.5: np.zeros(1)}, TypeError, r"must be str, bytes or int, not float"),
        ({"m": {None: np.zeros(1)}}, TypeError, r"not NoneType \(in 'm'\)"),
        ({"a/b": np.zeros(1), "a": {"b": np.zeros(1)}}, ValueError, "'a/b'"),
        ({"a": {"b": np.zeros(1)}, "a/b": np.zeros(1)}, ValueError, "'a/b'"),
        (
            {"a": {"b": np.zeros(1, dtype="datetime64[s]")}},
            TypeError,
            r"^tensor 'a/b': dtype datetime64\[s\] has no TensorFlow equivalent$",
        ),
        ({"a": np.zeros(1), "b": np.zeros(1, dtype=np.float16).view("V2")}, TypeError, "V2"),
    ],
)
def test_bad_states_are_refused(state: dict[Any, Any], error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        prepare(state)


def test_bytes_names_and_str_subclasses_take_the_per_entry_path() -> None:
    class Name(str):
        pass

    state = {b"caf\xc3\xa9": np.zeros(1), Name("n"): np.ones(1)}
    assert list(prepare(state)) == ["café", "n"]


@settings(max_examples=300, deadline=None)
@given(state=states())
def test_shared_prepare_matches_the_per_entry_code(state: dict[Any, Any]) -> None:
    """``prepare(share=True)`` gives what ``prepare`` gives (and the same errors); it returns
    the caller's dict itself only when that is flat, plain and numeric."""
    shared = outcome(lambda s: prepare(s, share=True), state)
    assert_same(shared, outcome(reference_prepare, state), identical=False)
    if shared[0] == "ok" and shared[1] is state:
        assert all(type(k) is str and k for k in state)
        assert all(type(v) is np.ndarray for v in state.values())


def test_shared_prepare_returns_only_flat_plain_dicts_as_they_are() -> None:
    flat = {f"layer_{i}/kernel": np.ones(4, dtype=np.float32) for i in range(50)}
    assert prepare(flat, share=True) is flat
    assert prepare(flat) is not flat  # the manager's copy
    with_bf16 = {**flat, "bf": np.ones(2, ml_dtypes.bfloat16)}  # a known numeric dtype
    assert prepare(with_bf16, share=True) is with_bf16
    for state in (
        {"model": flat},  # nested
        OrderedDict(flat),  # a dict subclass
        {**flat, "step": np.int64(3)},  # a NumPy scalar, not an array
        {**flat, "step": 3},  # a Python number
        {**flat, "name": np.array([b"x"], dtype=object)},  # strings
        {**flat, "t": np.zeros(2, "datetime64[s]")},  # refused
        {**flat, 7: np.ones(1)},  # an int name
    ):
        got = outcome(lambda s: prepare(s, share=True), state)
        assert got[1] is not state
        assert_same(got, outcome(reference_prepare, state), identical=False)


def test_one_shot_save_of_a_shared_dict(tmp_path: Any) -> None:
    """The one-shot save uses a flat plain dict as it is: the dict is left unchanged and the
    checkpoint holds its arrays; nested and odd states are copied and saved as before."""
    flat = {f"w{i}": np.full(3, i, np.float32) for i in range(20)}
    before = dict(flat)
    anyio.run(lambda: anyckpt.save(str(tmp_path / "a"), flat, durable=False))
    assert list(flat) == list(before)
    assert all(flat[k] is before[k] for k in flat)
    loaded = anyio.run(anyckpt.load, str(tmp_path / "a"))
    assert list(loaded) == sorted(flat)
    for key, value in flat.items():
        np.testing.assert_array_equal(loaded[key], value)
    odd = {"m": dict(flat), "s": "text", 3: np.int64(4)}
    anyio.run(lambda: anyckpt.save(str(tmp_path / "b"), odd, durable=False))
    assert odd["s"] == "text"
    assert list(odd) == ["m", "s", 3]
    loaded = anyio.run(anyckpt.load, str(tmp_path / "b"))
    assert loaded["s"] == b"text"
    assert int(loaded["3"]) == 4
    np.testing.assert_array_equal(loaded["m/w5"], flat["w5"])


@settings(max_examples=100)
@given(st.lists(st.integers(), max_size=300), st.data(), st.sampled_from([1, 3, 4096]))
def test_reordered_is_the_list_in_that_order(
    items: list[int], data: st.DataObject, chunk: int
) -> None:
    import anyckpt.tensors as tensors_module

    order = np.array(data.draw(st.permutations(range(len(items)))), dtype=np.int64)
    expected = [items[i] for i in order.tolist()]
    old = tensors_module._REORDER_CHUNK
    tensors_module._REORDER_CHUNK = chunk  # (a module constant: hypothesis runs share it)
    try:
        view = tensors_module.Reordered(items, order)
        assert len(view) == len(expected)
        assert list(view) == expected
        assert [view[i] for i in range(len(view))] == expected
        low = data.draw(st.integers(0, len(items)))
        high = data.draw(st.integers(low, len(items)))
        assert view[low:high] == expected[low:high]
        assert view[::2] == expected[::2]
        if items:
            assert view[-1] == expected[-1]
    finally:
        tensors_module._REORDER_CHUNK = old


def test_data_file_of_a_reordered_sequence_is_the_list_s(tmp_path: Any) -> None:
    """write_data_file given the arrays as a Reordered view (the one-shot save's) writes
    the bytes and entries it writes for the same arrays as a list."""
    from anyckpt.formats.v2_data import write_data_file
    from anyckpt.storage import Storage
    from anyckpt.tensors import Reordered

    rng = np.random.default_rng(3)
    arrays = [rng.standard_normal(1 + i % 7).astype(np.float32) for i in range(9000)]
    arrays[17] = np.arange(100_000, dtype=np.float64)  # not tiny: the mixed path
    order = rng.permutation(len(arrays)).astype(np.int64)
    keys = [b"k%05d" % i for i in range(len(arrays))]
    storage, root = Storage.from_url(str(tmp_path))
    entries = []
    for name, seq in (("list", [arrays[i] for i in order.tolist()]), ("view", None)):
        given = seq if seq is not None else Reordered(arrays, order)
        entries.append(
            write_data_file(storage, f"{root}/{name}", keys, given, False, 0, lambda: None)
        )
    assert (tmp_path / "list").read_bytes() == (tmp_path / "view").read_bytes()
    assert entries[0].as_entries() == entries[1].as_entries()
