"""atheris: the ``checkpoint`` state file (text-format CheckpointState) and the path rule
every name in it must pass before a manager touches a file."""

from __future__ import annotations

from _harness import main

if __name__ == "__main__":
    main("fuzz_state_file")
