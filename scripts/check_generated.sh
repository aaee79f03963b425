#!/usr/bin/env bash
# Fails when the committed sdk/generated/ code is stale (run `make proto`).
set -euo pipefail
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
scripts/gen_protos.sh "$tmp"
if ! diff -r "$tmp/opspawn" sdk/generated/opspawn -x __pycache__ >/dev/null; then
  diff -r "$tmp/opspawn" sdk/generated/opspawn -x __pycache__ | head -20
  echo "sdk/generated/ is stale: run 'make proto' and commit the result" >&2
  exit 1
fi
echo "sdk/generated/ is up to date"
