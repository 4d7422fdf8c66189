#!/usr/bin/env bash
# Regenerate the committed protobuf/gRPC code from proto/.
#   scripts/genproto.sh          write it into proto/netswap/v1/
#   scripts/genproto.sh --check  regenerate into a scratch dir and fail on any diff
# Uses the pinned grpcio-tools and mypy-protobuf of the venv that runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-.venv/bin/python}"
bindir="$(dirname "$py")"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
PATH="$bindir:$PATH" "$py" -m grpc_tools.protoc -Iproto \
  --python_out="$out" --grpc_python_out="$out" \
  --mypy_out="$out" --mypy_grpc_out="$out" \
  proto/netswap/v1/swap.proto
gen=(swap_pb2.py swap_pb2.pyi swap_pb2_grpc.py swap_pb2_grpc.pyi)
if [[ "${1:-}" == "--check" ]]; then
  status=0
  for f in "${gen[@]}"; do
    if ! diff -u "proto/netswap/v1/$f" "$out/netswap/v1/$f"; then
      echo "genproto: proto/netswap/v1/$f is stale; run 'make genproto' and commit" >&2
      status=1
    fi
  done
  exit $status
fi
for f in "${gen[@]}"; do cp "$out/netswap/v1/$f" "proto/netswap/v1/$f"; done
echo "genproto: wrote ${gen[*]} to proto/netswap/v1/"
