"""The generated protobuf modules: up to date, and registered under our own package."""

from __future__ import annotations

import importlib
import os
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest
from fixture_paths import TF_FIXTURES as FIXTURES
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import Descriptor, EnumDescriptor

import anyckpt._proto

ROOT = Path(__file__).resolve().parents[1]
#: TF's own tensor_bundle.proto and its imports, as the TF wheel describes them (a
#: FileDescriptorSet written by tools/tf/make_fixtures.py).
TF_DESCRIPTORS = FIXTURES / "tf_descriptors.binpb"
PACKAGE = "anyckpt.tf"


def proto_modules() -> list[ModuleType]:
    names = sorted(
        m.name for m in pkgutil.iter_modules(anyckpt._proto.__path__) if m.name.endswith("_pb2")
    )
    return [importlib.import_module(f"anyckpt._proto.{name}") for name in names]


def all_types(module: ModuleType) -> list[Descriptor | EnumDescriptor]:
    out: list[Descriptor | EnumDescriptor] = []

    def visit(message: Descriptor) -> None:
        out.append(message)
        out.extend(message.enum_types)
        for nested in message.nested_types:
            visit(nested)

    file = module.DESCRIPTOR
    out.extend(file.enum_types_by_name.values())
    for message in file.message_types_by_name.values():
        visit(message)
    return out


def test_generated_modules_are_up_to_date() -> None:
    pytest.importorskip("grpc_tools")
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_protos.py"), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_protos_live_in_our_package() -> None:
    modules = proto_modules()
    assert {m.__name__.rsplit(".", 1)[-1] for m in modules} >= {
        "tensor_bundle_pb2",
        "checkpoint_state_pb2",
        "saved_tensor_slice_pb2",
        "tensor_shape_pb2",
        "types_pb2",
    }
    seen = 0
    for module in modules:
        file = module.DESCRIPTOR
        assert file.package == PACKAGE, file.name
        assert file.name.startswith("anyckpt/_proto/"), file.name
        for dependency in file.dependencies:
            # Ours, or protobuf's well-known types (google/protobuf/any.proto...); never TF's.
            assert dependency.name.startswith(("anyckpt/_proto/", "google/protobuf/")), (
                file.name,
                dependency.name,
            )
            if dependency.name.startswith("google/"):
                assert dependency.package == "google.protobuf"
        for item in all_types(module):
            assert item.full_name.startswith(f"{PACKAGE}."), item.full_name
            assert not item.full_name.startswith("tensorflow."), item.full_name
            seen += 1
    assert seen > 20
    # What TF would register is absent from the default pool: no clash if both are loaded.
    from anyckpt._proto import tensor_bundle_pb2

    pool = descriptor_pool.Default()
    assert tensor_bundle_pb2.BundleEntryProto.DESCRIPTOR.full_name == "anyckpt.tf.BundleEntryProto"
    assert pool.FindMessageTypeByName("anyckpt.tf.BundleEntryProto") is not None
    with pytest.raises(KeyError):
        pool.FindMessageTypeByName("tensorflow.BundleEntryProto")
    with pytest.raises(KeyError):
        pool.FindFileByName("tensorflow/core/protobuf/tensor_bundle.proto")


def test_coexists_and_is_wire_compatible_with_tensorflows_protos() -> None:
    """Load TF's tensor_bundle.proto (package `tensorflow`, from the TF wheel's descriptors)
    into the default pool next to ours, in one process: no registration clash, and the bytes
    mean the same to both."""
    fds = descriptor_pb2.FileDescriptorSet.FromString(TF_DESCRIPTORS.read_bytes())
    names = [f.name for f in fds.file]
    assert "tensorflow/core/protobuf/tensor_bundle.proto" in names
    assert {f.package for f in fds.file} == {"tensorflow"}
    script = textwrap.dedent(
        """
        import sys
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
        from anyckpt._proto import tensor_bundle_pb2 as ours
        pool = descriptor_pool.Default()
        with open(sys.argv[1], "rb") as f:
            for file in descriptor_pb2.FileDescriptorSet.FromString(f.read()).file:
                pool.Add(file)
        class theirs:
            BundleEntryProto = message_factory.GetMessageClass(
                pool.FindMessageTypeByName("tensorflow.BundleEntryProto"))
            BundleHeaderProto = message_factory.GetMessageClass(
                pool.FindMessageTypeByName("tensorflow.BundleHeaderProto"))
        assert theirs.BundleEntryProto.DESCRIPTOR.full_name == "tensorflow.BundleEntryProto"
        assert ours.BundleEntryProto.DESCRIPTOR.full_name == "anyckpt.tf.BundleEntryProto"
        entry = ours.BundleEntryProto(dtype=14, shard_id=1, offset=17, size=6, crc32c=123)
        entry.shape.dim.add(size=3)
        sl = entry.slices.add()
        sl.extent.add(start=1, length=2)
        data = entry.SerializeToString(deterministic=True)
        parsed = theirs.BundleEntryProto.FromString(data)
        assert parsed.SerializeToString(deterministic=True) == data
        assert str(parsed) == str(entry), (str(parsed), str(entry))
        header = theirs.BundleHeaderProto(num_shards=2)
        header.version.producer = 1
        back = ours.BundleHeaderProto.FromString(header.SerializeToString())
        assert back.num_shards == 2 and back.version.producer == 1
        print("ok")
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(
        [sys.executable, "-c", script, str(TF_DESCRIPTORS)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "ok"
