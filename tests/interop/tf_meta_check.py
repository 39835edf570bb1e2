"""TensorFlow's side of the ``.meta`` interop tests (tests/interop/test_tf_meta.py).

Usage: ``$ANYCKPT_TF_PYTHON tests/interop/tf_meta_check.py JOBS.json``; prints one JSON object
(``{"error": ...}`` and exit status 1 on failure; TF's chatter goes to stderr). JOBS.json:

  {"restore": [{"meta", "prefix", "out", "resave"}, ...], "resource": DIR or null}

restore: per item, in a fresh graph, ``saver = tf.compat.v1.train.import_meta_graph(meta)``;
    run the variables' initializer, then ``saver.restore(sess, prefix)``; every global variable
    goes to ``out`` (npz, keyed by op name); with ``resave``, ``saver.save(sess, resave)`` too
    (which also exports TF's own ``resave.meta``).
    -> {"variables": [{"name", "dtype", "shape"}], "zero_init": bool, "saver_def": {...},
        "saved": path or null}
resource: a graph of resource variables saved by ``tf.compat.v1.train.Saver`` under keys
    ``res/a`` (float32 [3]) and ``res/b`` (int64 scalar) -> {"prefix"}.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tf_oracle import write_npz


def _numpy(tf: Any, value: Any, dtype: Any) -> np.ndarray:
    if dtype == tf.string:
        return np.asarray(value, dtype=object)
    return np.asarray(value, dtype=dtype.as_numpy_dtype)


def _is_zero(value: Any) -> bool:
    """All zeros (all empty strings for a string tensor)."""
    array = np.asarray(value)
    if array.dtype == object:
        return all(item == b"" for item in array.reshape(-1).tolist())
    if array.dtype.kind in "biufc":
        return not np.any(array)
    return not np.any(array.view(f"u{array.dtype.itemsize}"))  # bfloat16: its bits


def restore(tf: Any, job: Mapping[str, Any]) -> dict[str, Any]:
    with tf.Graph().as_default():
        saver = tf.compat.v1.train.import_meta_graph(job["meta"])
        variables = tf.compat.v1.global_variables()
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            initial = sess.run(variables)
            zero_init = all(_is_zero(v) for v in initial)
            saver.restore(sess, job["prefix"])
            values = sess.run(variables)
            write_npz(
                job["out"],
                [
                    (v.op.name, _numpy(tf, value, v.dtype.base_dtype))
                    for v, value in zip(variables, values, strict=True)
                ],
            )
            saved = None
            if job.get("resave"):
                os.makedirs(os.path.dirname(job["resave"]), exist_ok=True)
                saved = saver.save(sess, job["resave"])
        saver_def = saver.as_saver_def()
        return {
            "variables": [
                {"name": v.op.name, "dtype": v.dtype.base_dtype.name, "shape": v.shape.as_list()}
                for v in variables
            ],
            "zero_init": zero_init,
            "saver_def": {
                "max_to_keep": saver_def.max_to_keep,
                "keep_checkpoint_every_n_hours": saver_def.keep_checkpoint_every_n_hours,
                "sharded": saver_def.sharded,
                "version": int(saver_def.version),
            },
            "saved": saved,
        }


def resource(tf: Any, directory: str) -> dict[str, Any]:
    with tf.Graph().as_default():
        a = tf.Variable(np.arange(3, dtype=np.float32), name="a")
        b = tf.Variable(np.int64(5), name="b")
        saver = tf.compat.v1.train.Saver(var_list={"res/a": a, "res/b": b})
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            return {"prefix": saver.save(sess, os.path.join(directory, "model"))}


def main(argv: list[str]) -> int:
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything TF prints lands on stderr
    sys.stdout = sys.stderr
    try:
        import tensorflow as tf

        jobs = json.loads(Path(argv[1]).read_text())
        result: dict[str, Any] = {"restore": [restore(tf, job) for job in jobs["restore"]]}
        if jobs.get("resource"):
            result["resource"] = resource(tf, jobs["resource"])
        status = 0
    except Exception as e:
        traceback.print_exc()
        result, status = {"error": f"{type(e).__name__}: {e}"}, 1
    json.dump(result, out)
    out.write("\n")
    out.close()
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv))
