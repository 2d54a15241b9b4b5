#!/bin/sh
# What the package needs from proto/, generated (never edited by hand). One definition for `make proto`
# and the container image's build (deploy/image/build.sh):
#   OUT/hotlora/v1/*_pb2*.py, *.pyi         the hotlora.v1 stubs (package hotlora.v1)
#   OUT/hotlora/kserve_pb/inference.binpb   KServe as a descriptor set, not *_pb2 modules: those would
#                                           clash with tritonclient's in protobuf's default pool
#   OUT/hotlora/tinker_pb/tinker_public.binpb  Tinker's public wire, a descriptor set too: the tinker SDK
#                                           registers the same names (proto/tinker/README.md)
# Usage, from the repository root: [PYTHON=python] sh proto/generate.sh [OUT]   (OUT: gen)
set -eu
PYTHON=${PYTHON:-python}
out=${1:-gen}
rm -rf "$out/hotlora"
mkdir -p "$out/hotlora/kserve_pb" "$out/hotlora/tinker_pb"
"$PYTHON" -m grpc_tools.protoc -I proto --python_out="$out" --grpc_python_out="$out" --pyi_out="$out" \
    proto/hotlora/v1/*.proto
"$PYTHON" -m grpc_tools.protoc -I proto/kserve --include_imports \
    --descriptor_set_out="$out/hotlora/kserve_pb/inference.binpb" proto/kserve/*.proto
"$PYTHON" -m grpc_tools.protoc -I proto/tinker \
    --descriptor_set_out="$out/hotlora/tinker_pb/tinker_public.binpb" proto/tinker/*.proto
touch "$out/hotlora/v1/__init__.py" "$out/hotlora/kserve_pb/__init__.py" "$out/hotlora/tinker_pb/__init__.py"
