"""Real JAX (the ``dist`` extra): a training state of ``jax.Array`` leaves in the shapes JAX
code uses (dicts of parameters, an optax-style NamedTuple optimizer state, a dataclass) is
saved by the manager and restored into a fresh template: the same classes, ``jax.Array``
leaves on the template's devices, the same bits (bfloat16 included), and a jitted training
step continues exactly as if there had been no restart."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest

import anyckpt
from anyckpt.tree import StructureMismatchError, flatten_tree

jax = pytest.importorskip("jax", reason="needs JAX (the dist extra)")
jnp = jax.numpy


class AdamState(NamedTuple):  # as optax.ScaleByAdamState
    count: Any
    mu: dict[str, Any]
    nu: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class TrainState:  # as a flax.struct.dataclass
    params: dict[str, Any]
    opt: AdamState
    step: int


def init(key: Any) -> TrainState:
    k1, k2 = jax.random.split(key)
    params = {
        "dense": {"kernel": jax.random.normal(k1, (4, 3)), "bias": jnp.zeros(3)},
        "scale": jax.random.normal(k2, (3,)).astype(jnp.bfloat16),
    }
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    return TrainState(params, AdamState(jnp.zeros((), jnp.int32), zeros, zeros), step=0)


@jax.jit
def update(params: dict[str, Any], opt: AdamState) -> tuple[dict[str, Any], AdamState]:
    x = jnp.linspace(-1.0, 1.0, 8).reshape(2, 4)

    def loss(p: dict[str, Any]) -> Any:
        y = (x @ p["dense"]["kernel"] + p["dense"]["bias"]) * p["scale"].astype(jnp.float32)
        return jnp.mean(y**2)

    grads = jax.grad(loss)(params)
    count = opt.count + 1
    mu = jax.tree_util.tree_map(lambda m, g: 0.9 * m + 0.1 * g, opt.mu, grads)
    nu = jax.tree_util.tree_map(lambda v, g: 0.999 * v + 0.001 * g * g, opt.nu, grads)
    params = jax.tree_util.tree_map(
        lambda p, m, v: (p - 0.01 * m / (jnp.sqrt(v) + 1e-8)).astype(p.dtype), params, mu, nu
    )
    return params, AdamState(count, mu, nu)


def train(state: TrainState, steps: int) -> TrainState:
    params, opt = state.params, state.opt
    for _ in range(steps):
        params, opt = update(params, opt)
    return TrainState(params, opt, state.step + steps)


def leaves(state: TrainState) -> dict[str, Any]:
    """{name: leaf} (the dataclass is not a registered JAX pytree: anyckpt's own flattening)."""
    return flatten_tree(state)[0]


def leaves_equal(a: TrainState, b: TrainState) -> bool:
    x, y = leaves(a), leaves(b)
    return x.keys() == y.keys() and all(
        np.asarray(x[k]).dtype == np.asarray(y[k]).dtype
        and np.array_equal(np.asarray(x[k]), np.asarray(y[k]))
        for k in x
    )


def test_a_jax_training_state_resumes_bit_identically(tmp_path: Path) -> None:
    state = train(init(jax.random.PRNGKey(0)), 3)
    with anyckpt.sync.CheckpointManager(tmp_path) as manager:
        manager.save(state, step=state.step).wait()
    assert sorted(anyckpt.sync.load(str(tmp_path / "ckpt-3"))) == [
        "opt/count",
        "opt/mu/dense/bias",
        "opt/mu/dense/kernel",
        "opt/mu/scale",
        "opt/nu/dense/bias",
        "opt/nu/dense/kernel",
        "opt/nu/scale",
        "params/dense/bias",
        "params/dense/kernel",
        "params/scale",
        "step",
    ]  # fmt: skip  (TF-readable names)

    template = init(jax.random.PRNGKey(1))  # a fresh process's state: other values
    with anyckpt.sync.CheckpointManager(tmp_path) as manager:
        restored = manager.restore(template=template)

    assert isinstance(restored, TrainState)
    assert isinstance(restored.opt, AdamState)
    assert restored.step == 3
    got = jax.tree_util.tree_leaves((restored.params, restored.opt))  # dicts, a NamedTuple
    want = jax.tree_util.tree_leaves((template.params, template.opt))
    assert len(got) == len(want) == 10
    assert all(isinstance(leaf, jax.Array) for leaf in got)
    assert [leaf.sharding for leaf in got] == [leaf.sharding for leaf in want]
    assert restored.params["scale"].dtype == jnp.bfloat16
    assert leaves_equal(restored, state)
    assert leaves_equal(train(restored, 2), train(state, 2))


def test_a_template_of_another_shape_is_refused_by_name(tmp_path: Path) -> None:
    state = init(jax.random.PRNGKey(0))
    with anyckpt.sync.CheckpointManager(tmp_path) as manager:
        manager.save(state, step=1).wait()
        wrong = dataclasses.replace(
            state, params={**state.params, "scale": jnp.zeros(4, jnp.bfloat16)}
        )
        with pytest.raises(StructureMismatchError, match="'params/scale': the checkpoint holds"):
            manager.restore(template=wrong)
