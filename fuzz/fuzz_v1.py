"""atheris: a V1 (TensorSliceWriter) checkpoint file: table, SavedTensorSlices metadata and
slices, TensorProto values, read through the V1 format."""

from __future__ import annotations

import contextlib

from _harness import EXPECTED, main, read_everything, run_async, write_files


def test_one_input(data: bytes) -> None:
    url = write_files({"model.ckpt": data})
    with contextlib.suppress(*EXPECTED):
        run_async(read_everything, f"{url}/model.ckpt", "v1")


if __name__ == "__main__":
    main(test_one_input)
