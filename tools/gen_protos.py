"""Regenerate anyckpt's protobuf modules from protos/.

    python tools/gen_protos.py            # write src/anyckpt/_proto/*_pb2.py(i)
    python tools/gen_protos.py --check    # exit 1 if the committed files are out of date

The generator is grpcio-tools (pinned in the `test` extra), so the output is reproducible.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "protos"
PACKAGE_DIR = Path("anyckpt") / "_proto"
OUT_DIR = ROOT / "src" / PACKAGE_DIR


def generate(out_root: Path) -> list[Path]:
    """Compile every .proto under protos/anyckpt/_proto into out_root; return the files made."""
    import grpc_tools
    from grpc_tools import protoc  # imported here: only a test/dev dependency

    well_known = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    sources = sorted((PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        *(str(s.relative_to(PROTO_ROOT)) for s in sources),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted((out_root / PACKAGE_DIR).glob("*_pb2.py*"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        made = generate(Path(tmp))
        names = {p.name for p in made}
        if args.check:
            committed = {p.name for p in OUT_DIR.glob("*_pb2.py*")}
            stale = sorted(names ^ committed) + sorted(
                n
                for n in names & committed
                if not filecmp.cmp(Path(tmp) / PACKAGE_DIR / n, OUT_DIR / n, shallow=False)
            )
            if stale:
                print("out of date (run python tools/gen_protos.py):", *stale, file=sys.stderr)
                return 1
            return 0
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        for old in OUT_DIR.glob("*_pb2.py*"):
            old.unlink()
        for path in made:
            (OUT_DIR / path.name).write_bytes(path.read_bytes())
        print(f"wrote {len(made)} files to {OUT_DIR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
