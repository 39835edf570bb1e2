"""Multi-process saves: every rank writes its own shards, the primary commits one V2 bundle.

    import torch.distributed as dist
    from anyckpt.distributed import Sharded, TorchCoordinator

    dist.init_process_group("gloo")            # or NCCL: the coordinator makes a gloo group
    coordinator = TorchCoordinator(timeout=600)
    async with anyckpt.CheckpointManager("s3://bucket/run", coordinator=coordinator) as m:
        await m.save({"w": Sharded(w_local, w_shape, offsets), "step": step}, step=step)

See docs/distributed.md. The coordination interface (:class:`Coordinator`) is four blocking
collectives on small objects; :class:`TorchCoordinator` implements it on
``torch.distributed``, :class:`JaxCoordinator` on ``jax.distributed``'s key-value store,
:class:`SingleProcessCoordinator` in one process.
"""

from __future__ import annotations

from ._jax import JaxCoordinator
from ._torch import TorchCoordinator
from .base import DEFAULT_TIMEOUT, CoordinationError, Coordinator, SingleProcessCoordinator
from .plan import PlanError
from .sharded import Sharded, even_slice

__all__ = [
    "DEFAULT_TIMEOUT",
    "CoordinationError",
    "Coordinator",
    "JaxCoordinator",
    "PlanError",
    "Sharded",
    "SingleProcessCoordinator",
    "TorchCoordinator",
    "even_slice",
]
