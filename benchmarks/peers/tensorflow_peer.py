"""TensorFlow's own V2 saver, in the TF venv (.venv-tf): ``tf.compat.v1.train.Saver`` in graph
mode, as TensorFlow 1.x-style training loops (and the golden fixtures) use it.

The graph (one variable per tensor, a Saver over a ``{name: variable}`` dict) is built before
the clock starts; so are the session and, for saves, the variables' values (fed from the NumPy
state). What is timed is ``saver.save(sess, prefix, write_meta_graph=False,
write_state=False)`` (SaveV2 into a temporary directory, then MergeV2Checkpoints) and
``saver.restore(sess, prefix)`` (RestoreV2 and an assign per variable). Each is run once on
the same graph before the clock (see :func:`prepare`), so the numbers are TensorFlow's steady
state; the memory a restore's first run allocated is then already held by the variables, so
TensorFlow's restore RSS is that of a second restore. The 1% restore uses a second Saver over
those variables only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf
from _harness import Context, Tool, fsync_tree, main
from tensorflow.core.protobuf import saver_pb2
from workloads import State

tf.compat.v1.disable_v2_behavior()


class Model:
    """A graph with one variable per checkpoint key, a session, and savers."""

    def __init__(self, specs: Mapping[str, tuple[str, list[int]]], subset: list[str]) -> None:
        self.graph = tf.Graph()
        self.placeholders: dict[str, Any] = {}
        self.variables: dict[str, Any] = {}
        with self.graph.as_default():
            for i, (key, (dtype, shape)) in enumerate(sorted(specs.items())):
                ph = tf.compat.v1.placeholder(tf.dtypes.as_dtype(dtype), shape, name=f"p{i}")
                self.placeholders[key] = ph
                self.variables[key] = tf.compat.v1.Variable(ph, name=f"v{i}")
            self.init = tf.compat.v1.global_variables_initializer()
            self.saver = self._saver(self.variables)
            wanted = {k: self.variables[k] for k in subset if k in self.variables}
            self.subset_saver = self._saver(wanted) if wanted else None
        self.session = tf.compat.v1.Session(graph=self.graph)

    @staticmethod
    def _saver(var_list: dict[str, Any]) -> Any:
        return tf.compat.v1.train.Saver(
            var_list=var_list,
            write_version=saver_pb2.SaverDef.V2,
            save_relative_paths=True,
            max_to_keep=None,
        )

    def assign(self, state: State) -> None:
        feed = {self.placeholders[k]: v for k, v in state.items()}
        self.session.run(self.init, feed_dict=feed)


def _prefix(ctx: Context) -> str:
    return os.path.join(os.path.abspath(ctx.dir), "ckpt")


def _specs(state: State) -> dict[str, tuple[str, list[int]]]:
    return {
        k: ("string" if v.dtype == object else v.dtype.name, list(v.shape))
        for k, v in state.items()
    }


def convert(state: State) -> Model:
    model = Model(_specs(state), [])
    model.assign(state)
    return model


def save(ctx: Context, model: Model, durable: bool) -> None:  # type: ignore[override]
    model.saver.save(model.session, _prefix(ctx), write_meta_graph=False, write_state=False)
    if durable:
        fsync_tree(ctx.dir)


def prepare(ctx: Context, model: Model | None) -> None:
    """Before the clock: run the operation once on the real graph. A session's first run of
    a graph creates its kernels (for 10,000 variables: seconds); a training loop pays that
    once, so TensorFlow is measured in its steady state, as its own benchmark does."""
    if model is not None:  # a save: once into a scratch directory (run.py empties ctx.dir)
        model.saver.save(model.session, _prefix(ctx), write_meta_graph=False, write_state=False)
        return
    specs = {k: (ctx.dtypes[k], ctx.meta["shapes"][k]) for k in ctx.keys}
    model = ctx.extra["model"] = Model(specs, ctx.subset)
    subset = ctx.op == "restore_subset" and model.subset_saver is not None
    (model.subset_saver if subset else model.saver).restore(model.session, _prefix(ctx))


def _restore(ctx: Context, subset: bool) -> Mapping[str, Any]:
    model: Model = ctx.extra["model"]
    saver = model.subset_saver if subset else model.saver
    saver.restore(model.session, _prefix(ctx))
    keys = ctx.subset if subset else ctx.keys
    return {k: model.variables[k] for k in keys}


def count(ctx: Context, result: Mapping[str, Any]) -> Mapping[str, Any]:
    """The restored values as NumPy arrays (fetched after the clock stopped)."""
    model: Model = ctx.extra["model"]
    values = model.session.run(dict(result))
    return {k: np.asarray(v) for k, v in values.items()}


TOOL = Tool(
    "tensorflow",
    save=save,
    restore=lambda ctx: _restore(ctx, False),
    restore_subset=lambda ctx: _restore(ctx, True),
    convert=convert,
    prepare=prepare,
    fetch=count,
    notes=f"tensorflow {tf.__version__}, tf.compat.v1.train.Saver (V2), graph mode",
)

if __name__ == "__main__":
    main(TOOL)
