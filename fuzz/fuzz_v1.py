"""atheris: a V1 (TensorSliceWriter) checkpoint file: table, SavedTensorSlices metadata and
slices, TensorProto values, read through the V1 format."""

from __future__ import annotations

from _harness import main

if __name__ == "__main__":
    main("fuzz_v1")
