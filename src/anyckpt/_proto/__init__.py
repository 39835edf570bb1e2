"""Generated protobuf modules (see protos/ and tools/gen_protos.py). Do not edit."""
