"""Nested trainer state (issue 16): flattening to TF-readable names, rebuilding, restoring
into a template with checks, and a real PyTorch model + AdamW resumed bit-identically."""

from __future__ import annotations

import dataclasses
import json
from collections import OrderedDict
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import anyckpt
from anyckpt.tensors import as_tensor
from anyckpt.tree import StructureMismatchError, flatten_tree, restore_into, unflatten_tree

leaves = st.one_of(
    st.integers(-(2**62), 2**62),
    st.floats(allow_nan=False),
    st.booleans(),
    st.text(max_size=5),
    st.none(),
    st.builds(np.array, st.lists(st.floats(-1e6, 1e6), max_size=4)).map(
        lambda a: a.astype(np.float32)
    ),
)
keys = st.one_of(st.integers(0, 50), st.text(min_size=1, max_size=4).filter(lambda k: "/" not in k))
trees = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(keys, children, max_size=3).filter(
            lambda d: len({str(k) for k in d}) == len(d)  # 1 and "1" would share a name
        ),
    ),
    max_leaves=10,
)


def same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return type(b) is dict and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return type(a) is type(b) and a == b


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(keys, trees, max_size=4).filter(lambda d: len({str(k) for k in d}) == len(d))
)
def test_flatten_then_unflatten_rebuilds_the_structure(state: dict[Any, Any]) -> None:
    flat, tree = flatten_tree(state)
    tree = json.loads(json.dumps(tree))  # the description is plain JSON
    assert all("/" not in part for name in flat for part in [name.split("/")[-1]])
    stored = {k: as_tensor(v) for k, v in flat.items()}  # as save() stores them
    assert same(unflatten_tree(tree, stored), state)
    assert same(restore_into(state, stored), state)


def test_names_stay_tf_readable() -> None:
    flat, _ = flatten_tree(
        {"optimizer": {"state": {0: {"exp_avg": np.zeros(2)}}, "groups": [{"lr": 0.1}]}}
    )
    assert sorted(flat) == ["optimizer/groups/0/lr", "optimizer/state/0/exp_avg"]


@pytest.mark.parametrize(
    ("state", "error"),
    [
        ({"a/b": 1}, ValueError),
        ({"": 1}, ValueError),
        ({1.5: 1}, TypeError),
        ({True: 1}, TypeError),
        ({1: 1, "1": 2}, ValueError),
    ],
)
def test_bad_keys_are_refused(state: dict[Any, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        flatten_tree(state)


class Pair(NamedTuple):
    w: np.ndarray
    n: int


def test_restore_into_checks_and_names_the_first_mismatch() -> None:
    template = OrderedDict(a=np.zeros((2, 3), np.float32), b=[Pair(np.zeros(2), 1), None])
    flat = {"a": np.ones((2, 3), np.float32), "b/0/w": np.ones(2), "b/0/n": np.asarray(7), "x": 1}
    out = restore_into(template, flat)
    assert type(out) is OrderedDict
    assert isinstance(out["b"][0], Pair)
    assert out["b"][0].n == 7
    assert out["b"][1] is None
    with pytest.raises(
        StructureMismatchError, match=r"'a': the checkpoint holds float64, the template float32"
    ):
        restore_into(template, {**flat, "a": np.ones((2, 3))})
    with pytest.raises(StructureMismatchError, match=r"'a': the checkpoint holds shape \(3, 2\)"):
        restore_into(template, {**flat, "a": np.ones((3, 2), np.float32)})
    with pytest.raises(StructureMismatchError, match=r"'b/0/w' is not in the checkpoint"):
        restore_into(template, {k: v for k, v in flat.items() if k != "b/0/w"})
    assert issubclass(StructureMismatchError, anyckpt.CheckpointError)


try:
    import torch
except ImportError:  # the dist extra
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="needs PyTorch (the dist extra)")


def train(model: Any, opt: Any, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 4, generator=g)
        loss = (model(x) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def make() -> tuple[Any, Any]:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    return model, torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.8, 0.95))


@needs_torch
def test_pytorch_model_and_adamw_resume_bit_identically(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, opt = make()
    train(model, opt, 3, seed=1)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    flat, tree = flatten_tree(state)
    assert "optimizer/state/0/exp_avg" in flat
    (tmp_path / "tree.json").write_text(json.dumps(tree))
    with anyckpt.sync.CheckpointManager(tmp_path / "run") as manager:
        manager.save(flat, step=3).wait()

    # A new process: fresh model and optimizer (whose state is still empty).
    fresh_model, fresh_opt = make()
    with anyckpt.sync.CheckpointManager(tmp_path / "run") as manager:
        restored_model = manager.restore(template={"model": fresh_model.state_dict()})
        everything = manager.restore()
    fresh_model.load_state_dict(restored_model["model"])
    saved = unflatten_tree(json.loads((tmp_path / "tree.json").read_text()), everything)
    assert saved["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.95)
    assert isinstance(next(iter(saved["optimizer"]["state"])), int)
    fresh_opt.load_state_dict(saved["optimizer"])

    train(model, opt, 3, seed=2)
    train(fresh_model, fresh_opt, 3, seed=2)
    for (name, a), b in zip(
        model.state_dict().items(), fresh_model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    assert opt.state_dict()["state"][0]["step"] == fresh_opt.state_dict()["state"][0]["step"]


@needs_torch
def test_bfloat16_and_requires_grad_tensors() -> None:
    w = torch.randn(3, 2, requires_grad=True)
    b16 = torch.randn(5).to(torch.bfloat16)
    flat, tree = flatten_tree({"w": w, "b": b16})
    assert flat["b"].dtype.name == "bfloat16"
    out = unflatten_tree(tree, flat)
    assert torch.equal(out["b"], b16)
    assert out["b"].dtype == torch.bfloat16
    assert torch.equal(out["w"], w.detach())
    into = restore_into({"w": torch.zeros(3, 2), "b": torch.zeros(5, dtype=torch.bfloat16)}, flat)
    assert torch.equal(into["b"], b16)


# -- through the manager: save() records the structure, restore(structure=True) rebuilds ----


def test_manager_saves_nested_structures_under_tf_readable_names(tmp_path: Path) -> None:
    state = {
        "optimizer": {
            "state": {0: {"exp_avg": np.ones(3, np.float32), "step": 7}},
            "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0, 1], "wd": None}],
        },
        "history": (np.zeros(2), "warmup"),
    }
    with anyckpt.sync.CheckpointManager(tmp_path) as manager:
        manager.save(state, step=1).wait()
        rebuilt = manager.restore(structure=True)
        flat = manager.restore()
    assert same(rebuilt, {**state, "history": (np.zeros(2), "warmup")})
    assert rebuilt["optimizer"]["param_groups"][0]["params"] == [0, 1]  # a list of ints again
    assert sorted(flat) == [
        "history/0",
        "history/1",
        "optimizer/param_groups/0/betas",
        "optimizer/param_groups/0/lr",
        "optimizer/param_groups/0/params",
        "optimizer/state/0/exp_avg",
        "optimizer/state/0/step",
    ]
    # The description rides in the checkpoint's sidecar, beside TensorFlow's files.
    assert sorted(p.name for p in tmp_path.iterdir() if "ckpt-1" in p.name) == [
        "ckpt-1.data-00000-of-00001",
        "ckpt-1.index",
        "ckpt-1.metrics.json",
    ]


def test_plain_states_stay_flat_and_record_nothing(tmp_path: Path) -> None:
    state = {"model": {"w": np.ones(2)}, "step": 3, "lr": [0.5, 0.25]}
    with anyckpt.sync.CheckpointManager(tmp_path) as manager:
        manager.save(state, step=1).wait()
        assert sorted(manager.restore()) == ["lr", "model/w", "step"]
        nested = manager.restore(structure=True)  # no description: the names, nested
    assert sorted(nested) == ["lr", "model", "step"]
    assert np.array_equal(nested["model"]["w"], np.ones(2))
    assert not list(tmp_path.glob("*.metrics.json"))


def test_nesting_names_that_collide_is_refused() -> None:
    from anyckpt.tree import nest_names

    assert nest_names({"a/b": 1, "c": 2}) == {"a": {"b": 1}, "c": 2}
    with pytest.raises(StructureMismatchError, match="restore it flat"):
        nest_names({"dense/kernel": 1, "dense/kernel/Adam": 2})


def test_a_damaged_description_is_a_checkpoint_error_naming_the_file(tmp_path: Path) -> None:
    with anyckpt.sync.CheckpointManager(tmp_path) as manager:
        manager.save({"a": [np.zeros(1), None]}, step=1).wait()
    sidecar = tmp_path / "ckpt-1.metrics.json"
    for bad in ({"dict": 5}, {"list": [{"leaf": "nonsense"}]}, {"list": [{"leaf": "tensor"}]}):
        sidecar.write_text(json.dumps({"step": 1, "metrics": {}, "tree": bad}))
        with anyckpt.sync.CheckpointManager(tmp_path) as manager:
            with pytest.raises(StructureMismatchError, match=r"ckpt-1\.metrics\.json"):
                manager.restore(structure=True)
            assert sorted(manager.restore()) == ["a/0"]  # flat, it still restores


class Params(NamedTuple):
    w: np.ndarray
    b: np.ndarray


@dataclasses.dataclass(frozen=True)
class TrainState:
    params: Params
    opt: dict[str, Any]
    step: int


def test_jax_style_pytrees_restore_into_a_template(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    state = TrainState(
        Params(rng.standard_normal((3, 2)).astype(np.float32), np.zeros(2, np.float32)),
        {"mu": [np.ones(2), np.full(3, 2.0)], "count": np.int32(5)},
        step=11,
    )
    with anyckpt.sync.CheckpointManager(tmp_path) as manager:
        manager.save(state, step=11).wait()
        template = TrainState(
            Params(np.zeros((3, 2), np.float32), np.ones(2, np.float32)),
            {"mu": [np.zeros(2), np.zeros(3)], "count": np.int32(0)},
            step=0,
        )
        out = manager.restore(template=template)
        rebuilt = manager.restore(structure=True)  # without a template: dicts and tuples
        assert sorted(manager.restore()) == [
            "opt/count", "opt/mu/0", "opt/mu/1", "params/b", "params/w", "step",
        ]  # fmt: skip
    assert isinstance(out, TrainState)
    assert isinstance(out.params, Params)
    assert out.step == 11
    assert np.array_equal(out.params.w, state.params.w)
    assert np.array_equal(out.opt["mu"][1], np.full(3, 2.0))
    assert isinstance(rebuilt, dict)
    assert np.array_equal(rebuilt["params"]["w"], state.params.w)  # a NamedTuple: by field
    bad = TrainState(Params(np.zeros((2, 3), np.float32), np.ones(2, np.float32)), {}, 0)
    mismatch = r"'params/w': the checkpoint holds shape"
    with (
        anyckpt.sync.CheckpointManager(tmp_path) as manager,
        pytest.raises(StructureMismatchError, match=mismatch),
    ):
        manager.restore(template=bad)


@needs_torch
def test_pytorch_run_resumes_from_manager_save_and_restore_structure(tmp_path: Path) -> None:
    """The state dicts go to save() as they are; restore(structure=True) gives them back as
    load_state_dict takes them (int keys, lists, tuples, tensors), and training continues
    bit-identically."""
    torch.manual_seed(0)
    model, opt = make()
    train(model, opt, 3, seed=1)
    with anyckpt.sync.CheckpointManager(tmp_path / "run") as manager:
        manager.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, step=3)

    fresh_model, fresh_opt = make()
    with anyckpt.sync.CheckpointManager(tmp_path / "run") as manager:
        restored = manager.restore(structure=True)
        keys = anyckpt.sync.load(manager.latest_checkpoint)
    assert "optimizer/state/0/exp_avg" in keys  # TF-readable names
    assert isinstance(restored["model"]["0.weight"], torch.Tensor)
    assert restored["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.95)
    fresh_model.load_state_dict(restored["model"])
    fresh_opt.load_state_dict(restored["optimizer"])
    train(model, opt, 3, seed=2)
    train(fresh_model, fresh_opt, 3, seed=2)
    for a, b in zip(model.parameters(), fresh_model.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(
        opt.state_dict()["state"].values(), fresh_opt.state_dict()["state"].values(), strict=True
    ):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


@needs_torch
def test_bfloat16_model_and_grad_tensors_through_the_manager(tmp_path: Path) -> None:
    model = torch.nn.Linear(4, 3).to(torch.bfloat16)
    grad_param = torch.randn(3, requires_grad=True)
    with anyckpt.sync.CheckpointManager(tmp_path) as manager:
        manager.save({"model": model.state_dict(), "p": grad_param}, step=1).wait()
        out = manager.restore(structure=True)
        stored = manager.restore()
    assert stored["model/weight"].dtype.name == "bfloat16"  # TF's bfloat16, through the bits
    assert out["model"]["weight"].dtype == torch.bfloat16
    assert torch.equal(out["model"]["weight"], model.weight.detach())
    assert torch.equal(out["p"], grad_param.detach())
    assert not out["p"].requires_grad
