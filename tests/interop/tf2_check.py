"""TensorFlow 2 object-based checkpoints, the TensorFlow side (run in the TF venv by
test_tf2_object.py). Each command prints one JSON object (``{"error": ...}`` on failure).

  module-restore PREFIX SPEC_JSON OUT_PREFIX
      Builds ``tf.train.Checkpoint`` over ``tf.Module``s from SPEC (a nested mapping whose
      leaves are ``[dtype, shape]``; names may hold '/' and '.'), restores PREFIX with
      ``assert_consumed()``, then ``write``s OUT_PREFIX from the restored variables.
  module-save PREFIX [--cycle]   (the ``*-save`` commands use ``Checkpoint.save``: PREFIX-1)
      A ``tf.train.Checkpoint`` of a variable and nested modules (names with '/' and '.');
      ``--cycle`` makes a child refer back to its parent.
  keras-save PREFIX
      A Keras model (two Dense layers) and Adam after one train step, saved with
      ``tf.train.Checkpoint(model=, optimizer=).write``.
  keras-restore PREFIX OUT_PREFIX
      The same model and optimizer built fresh, restored from PREFIX with
      ``assert_consumed()``, written to OUT_PREFIX.
  slots-save PREFIX / slots-restore PREFIX OUT_PREFIX
      A variable and a ``tf.compat.v1.train.AdamOptimizer`` (slot variables m and v: keys
      ``.OPTIMIZER_SLOT``) after one step; saved, or restored with ``assert_consumed()`` and
      written again.
  manager-continue DIR SPEC_JSON
      ``tf.train.CheckpointManager`` over a Checkpoint of SPEC in DIR: restores the latest
      with ``assert_consumed()`` and saves once more.
      -> {"restored", "saved", "checkpoints", "save_counter"}
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _tf() -> Any:
    import tensorflow as tf

    return tf


def _module(spec: dict[str, Any]) -> Any:
    tf = _tf()
    module = tf.Module()
    for name, sub in spec.items():
        setattr(module, name, _node(sub))
    return module


def _node(sub: Any) -> Any:
    tf = _tf()
    if isinstance(sub, list):
        dtype, shape = sub
        return tf.Variable(tf.zeros(shape, dtype=dtype))
    return _module(sub)


def _checkpoint(spec: dict[str, Any]) -> Any:
    tf = _tf()
    return tf.train.Checkpoint(**{name: _node(sub) for name, sub in spec.items()})


def module_restore(prefix: str, spec_json: str, out: str) -> dict[str, Any]:
    ckpt = _checkpoint(json.loads(spec_json))
    ckpt.restore(prefix).assert_consumed()
    return {"written": ckpt.write(out)}  # restore made save_counter: written too


def module_save(prefix: str, *flags: str) -> dict[str, Any]:
    tf = _tf()
    nested = tf.Module()
    nested.w = tf.Variable([[1.0, 2.0], [3.0, 4.0]])
    inner = tf.Module()
    setattr(inner, "a/b.c", tf.Variable([7, 8, 9], dtype=tf.int64))
    nested.inner = inner
    if "--cycle" in flags:
        inner.parent = nested
    ckpt = tf.train.Checkpoint(v=tf.Variable([0.5, -1.5, 2.5]), nested=nested)
    return {"written": ckpt.save(prefix)}


def _keras() -> tuple[Any, Any]:
    tf = _tf()
    tf.keras.utils.set_random_seed(7)
    model = tf.keras.Sequential(
        [tf.keras.Input((3,)), tf.keras.layers.Dense(4), tf.keras.layers.Dense(2)]
    )
    optimizer = tf.keras.optimizers.Adam(0.01)
    optimizer.build(model.trainable_variables)
    return model, optimizer


def keras_save(prefix: str) -> dict[str, Any]:
    import numpy as np

    tf = _tf()
    model, optimizer = _keras()
    model.compile(optimizer=optimizer, loss="mse")
    model.train_on_batch(np.ones((2, 3), np.float32), np.ones((2, 2), np.float32))
    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer)
    return {"written": ckpt.save(prefix), "keras": tf.keras.__version__}


def keras_restore(prefix: str, out: str) -> dict[str, Any]:
    tf = _tf()
    model, optimizer = _keras()
    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer)
    ckpt.restore(prefix).assert_consumed()
    return {"written": ckpt.write(out)}  # restore made save_counter: written too


def _slots() -> tuple[Any, Any, Any]:
    tf = _tf()
    v = tf.Variable([1.0, 2.0, 3.0])
    opt = tf.compat.v1.train.AdamOptimizer(0.1)
    return v, opt, tf.train.Checkpoint(v=v, opt=opt)


def slots_save(prefix: str) -> dict[str, Any]:
    tf = _tf()
    v, opt, ckpt = _slots()
    opt.minimize(lambda: tf.reduce_sum(v * v), var_list=[v])
    return {"written": ckpt.save(prefix)}


def slots_restore(prefix: str, out: str) -> dict[str, Any]:
    v, opt, ckpt = _slots()
    status = ckpt.restore(prefix)
    # Slot variables are created on the optimizer's first use; restore-on-create fills them.
    opt._create_slots([v])  # what apply_gradients does before its first step
    status.assert_consumed()
    return {"written": ckpt.write(out), "m": opt.get_slot(v, "m").numpy().tolist()}


def manager_continue(directory: str, spec_json: str) -> dict[str, Any]:
    tf = _tf()
    ckpt = _checkpoint(json.loads(spec_json))
    manager = tf.train.CheckpointManager(ckpt, directory, max_to_keep=3)
    restored = manager.latest_checkpoint
    ckpt.restore(restored).assert_consumed()
    counter = int(ckpt.save_counter.numpy())
    saved = manager.save()
    return {
        "restored": restored,
        "save_counter": counter,
        "saved": saved,
        "checkpoints": list(manager.checkpoints),
    }


COMMANDS = {
    "module-restore": module_restore,
    "module-save": module_save,
    "keras-save": keras_save,
    "keras-restore": keras_restore,
    "slots-save": slots_save,
    "slots-restore": slots_restore,
    "manager-continue": manager_continue,
}


def main(argv: list[str]) -> int:
    try:
        result = COMMANDS[argv[0]](*argv[1:])
    except BaseException as e:  # report everything as JSON, with the traceback on stderr
        traceback.print_exc()
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
