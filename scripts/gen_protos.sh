#!/usr/bin/env bash
# Generates Python modules and typed stubs from protos/ into the directory $1.
# Builds in a scratch directory, then replaces files one by one (rename is atomic),
# so a server or test running meanwhile never sees a missing module.
set -euo pipefail
out=${1:?usage: gen_protos.sh OUTDIR}
py=${PYTHON:-.venv/bin/python}
export PATH="$(cd "$(dirname "$py")" && pwd):$PATH"  # protoc finds the mypy plugins here
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
"$py" -m grpc_tools.protoc -Iprotos \
  --python_out="$scratch" --grpc_python_out="$scratch" \
  --mypy_out=quiet:"$scratch" --mypy_grpc_out=quiet:"$scratch" \
  protos/opspawn/opscore/v1/*.proto
for d in opspawn opspawn/opscore opspawn/opscore/v1; do
  touch "$scratch/$d/__init__.py" "$scratch/$d/py.typed"
  mkdir -p "$out/$d"
  for f in "$scratch/$d"/*; do
    [ -f "$f" ] || continue
    cp "$f" "$out/$d/.$(basename "$f").tmp" && mv "$out/$d/.$(basename "$f").tmp" "$out/$d/$(basename "$f")"
  done
  for f in "$out/$d"/*; do  # modules of protos that no longer exist
    [ -f "$f" ] && [ ! -e "$scratch/$d/$(basename "$f")" ] && rm "$f"
  done
done
exit 0
