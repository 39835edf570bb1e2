"""The state each rank of the multi-process tests saves, and the checkpoint it adds up to.

Every kind of thing a distributed job holds: replicated tensors (on every rank: written once),
tensors of one rank only, row- and column-sharded tensors (uneven splits, so some ranks hold
more than others, and one where some ranks hold nothing), an empty sharded tensor, a
``Partitioned`` every rank holds in full, strings, a scalar.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import anyckpt
from anyckpt.distributed import Sharded


def global_state(world_size: int, step: int) -> dict[str, np.ndarray]:
    """What the checkpoint of ``step`` saved by ``world_size`` ranks holds."""
    out: dict[str, np.ndarray] = {
        "model/emb": (np.arange(30, dtype=np.float32).reshape(10, 3) + step),
        "model/cols": (np.arange(32, dtype=np.int32).reshape(4, 8) * 10 + step),
        "model/bias": np.linspace(0, 1, 7, dtype=np.float32) * step,
        "model/tiny": np.array([[1.5, 2.5], [3.5, 4.5]], dtype=np.float64) * step,
        "model/zero": np.zeros((0, 5), dtype=np.float32),
        "model/table": np.arange(12, dtype=np.int64).reshape(6, 2) * step,
        "step": np.array(step, dtype=np.int64),
        "names": np.array([b"alpha", f"step{step}".encode()], dtype=object),
    }
    for rank in range(world_size):
        out[f"rank{rank}/private"] = np.full(rank + 1, rank * 100 + step, dtype=np.int64)
    return out


def rank_state(rank: int, world_size: int, step: int) -> dict[str, Any]:
    """What rank ``rank`` passes to ``save``."""
    full = global_state(world_size, step)
    return {
        "model": {
            "emb": Sharded.split(full["model/emb"], rank, world_size, axis=0),
            "cols": Sharded.split(full["model/cols"], rank, world_size, axis=1),
            "bias": full["model/bias"],
            # 2 rows over up to 4 ranks: ranks 2 and 3 hold nothing.
            "tiny": Sharded.split(full["model/tiny"], rank, world_size, axis=0),
            "zero": Sharded.split(full["model/zero"], rank, world_size, axis=0),
            "table": anyckpt.Partitioned.split(full["model/table"], 3, axis=0),
        },
        "step": full["step"],
        "names": full["names"],
        f"rank{rank}/private": full[f"rank{rank}/private"],
    }


def stored_bytes(world_size: int, step: int) -> int:
    """Data bytes of the checkpoint when everything is stored once (numeric tensors only)."""
    return sum(a.nbytes for a in global_state(world_size, step).values() if a.dtype != object)
