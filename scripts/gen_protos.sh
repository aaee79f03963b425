#!/usr/bin/env bash
# Generates Python modules and typed stubs from protos/ into the directory $1.
set -euo pipefail
out=${1:?usage: gen_protos.sh OUTDIR}
py=${PYTHON:-.venv/bin/python}
export PATH="$(cd "$(dirname "$py")" && pwd):$PATH"  # protoc finds the mypy plugins here
rm -rf "$out/opspawn"
mkdir -p "$out"
"$py" -m grpc_tools.protoc -Iprotos \
  --python_out="$out" --grpc_python_out="$out" \
  --mypy_out=quiet:"$out" --mypy_grpc_out=quiet:"$out" \
  protos/opspawn/opscore/v1/*.proto
for d in "$out/opspawn" "$out/opspawn/opscore" "$out/opspawn/opscore/v1"; do
  touch "$d/__init__.py" "$d/py.typed"
done
