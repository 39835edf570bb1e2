"""A state that cannot be saved says which tensor, by its full name; PyTorch tensors save as
they are: bfloat16 and float8 through their bits (no copy), parameters that require grad
detached. Real PyTorch (CPU), through every save path: anyckpt.save, the manager (async and
sync) and the distributed save."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

import anyckpt
from anyckpt.distributed import SingleProcessCoordinator
from anyckpt.tensors import as_tensor

torch = pytest.importorskip("torch")  # installed with the dist extra

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _optimizer_state(bad: Any) -> dict[str, Any]:
    """The shape of a PyTorch optimizer's state dict (parameters keyed by number)."""
    return {
        "model": {"w": np.zeros(3, dtype=np.float32)},
        "optimizer": {"state": {0: {"step": np.int64(1), "exp_avg": bad}}},
    }


BAD_VALUES = {
    "datetime64[Y]": (
        lambda: np.zeros(2, dtype="datetime64[Y]"),
        "dtype datetime64[Y] has no TensorFlow equivalent",
    ),
    "None in strings": (
        lambda: np.array(["a", None], dtype=object),
        "string tensors hold bytes or str, not NoneType",
    ),
    "torch complex32": (
        lambda: torch.zeros(2, dtype=torch.complex32),
        "dtype torch.complex32 has no TensorFlow equivalent",
    ),
}


async def _save_async(path: Path, state: dict[str, Any]) -> None:
    await anyckpt.save(path / "one", state)


async def _save_manager(path: Path, state: dict[str, Any]) -> None:
    async with anyckpt.CheckpointManager(path) as manager:
        await (await manager.save(state, step=1))


async def _save_distributed(path: Path, state: dict[str, Any]) -> None:
    async with anyckpt.CheckpointManager(path, coordinator=SingleProcessCoordinator()) as m:
        await (await m.save(state, step=1))


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("bad", list(BAD_VALUES))
@pytest.mark.parametrize("save", [_save_async, _save_manager, _save_distributed])
async def test_a_save_error_names_the_tensor(tmp_path: Path, bad: str, save: Any) -> None:
    make, text = BAD_VALUES[bad]
    with pytest.raises(TypeError) as info:
        await save(tmp_path, _optimizer_state(make()))
    message = str(info.value)
    assert message.startswith("tensor 'optimizer/state/0/exp_avg': "), message
    assert message.endswith(text), message
    assert not any(p.name.startswith(("one", "ckpt-1")) for p in tmp_path.iterdir())


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
def test_sync_save_error_names_the_tensor(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"^tensor 'optimizer/state/0/exp_avg': .*NoneType"):
        anyckpt.sync.save(tmp_path / "one", _optimizer_state(np.array([None], dtype=object)))
    with (
        anyckpt.sync.CheckpointManager(tmp_path / "run") as manager,
        pytest.raises(TypeError, match=r"^tensor 'optimizer/state/0/exp_avg': .*complex32"),
    ):
        manager.save(_optimizer_state(torch.zeros(1, dtype=torch.complex32)))


# -- PyTorch tensors that NumPy cannot take as they are ------------------------------------


@pytest.mark.parametrize(
    ("dtype", "ml_dtype"),
    [
        (torch.bfloat16, ml_dtypes.bfloat16),
        (torch.float8_e4m3fn, ml_dtypes.float8_e4m3fn),
        (torch.float8_e5m2, ml_dtypes.float8_e5m2),
    ],
)
def test_torch_narrow_floats_are_viewed_through_their_bits(dtype: Any, ml_dtype: Any) -> None:
    source = torch.linspace(-3, 3, 24).reshape(4, 6).to(dtype)
    for tensor in (source, source.t(), source[:, ::2]):  # contiguous or not
        array = as_tensor(tensor)
        assert array.dtype == np.dtype(ml_dtype)
        assert array.shape == tuple(tensor.shape)
        # The same memory: no copy.
        assert array.__array_interface__["data"][0] == tensor.data_ptr()
        bits = torch.tensor(array.view(np.uint8 if array.itemsize == 1 else np.int16))
        same = tensor.view(torch.uint8 if array.itemsize == 1 else torch.int16)
        assert torch.equal(bits, same)
        assert np.array_equal(
            array.astype(np.float32), tensor.to(torch.float32).numpy(), equal_nan=True
        )


async def test_a_torch_model_and_optimizer_round_trip(tmp_path: Path) -> None:
    """bf16 parameters that require grad, and an Adam optimizer's state keyed by number."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4).to(torch.bfloat16)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 8, dtype=torch.bfloat16)).sum().backward()
    optimizer.step()
    assert model.weight.requires_grad
    # (param_groups, a list of hyperparameter dicts, is not a tensor: not saved here.)
    optimizer_state = {"state": optimizer.state_dict()["state"]}
    state = {"model": dict(model.named_parameters()), "optimizer": optimizer_state}
    async with anyckpt.CheckpointManager(tmp_path) as manager:
        await (await manager.save(state, step=1))
        restored = await manager.restore()
    weight = restored["model/weight"]
    assert weight.dtype == np.dtype(ml_dtypes.bfloat16)
    assert np.array_equal(weight.view(np.int16), model.weight.detach().view(torch.int16).numpy())
    exp_avg = restored["optimizer/state/0/exp_avg"]
    expected = optimizer.state_dict()["state"][0]["exp_avg"]
    assert np.array_equal(exp_avg.view(np.int16), expected.view(torch.int16).numpy())


def test_a_tensor_that_requires_grad_is_saved_detached(tmp_path: Path) -> None:
    weight = torch.randn(3, 5, requires_grad=True)
    anyckpt.sync.save(tmp_path / "one", {"w": weight * 2})  # a non-leaf, part of a graph
    loaded = anyckpt.sync.load(tmp_path / "one")
    assert np.array_equal(loaded["w"], (weight * 2).detach().numpy())
