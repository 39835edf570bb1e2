"""atheris: the ``checkpoint`` state file (text-format CheckpointState) and the path rule
every name in it must pass before a manager touches a file."""

from __future__ import annotations

from _harness import EXPECTED, main

from anyckpt.codecs.state_file import decode_state, relativize


def test_one_input(data: bytes) -> None:
    try:
        state = decode_state(data)
    except EXPECTED:
        return
    for path in (state.model_checkpoint_path, *state.all_model_checkpoint_paths):
        try:
            name = relativize(path, "/root/ckpts")
        except EXPECTED:
            continue
        # What passes is a plain file name directly inside the directory.
        for bad in ("/", "\\", ":", "\x00"):
            assert bad not in name, name
        assert name not in ("", ".", ".."), name


if __name__ == "__main__":
    main(test_one_input)
