#!/usr/bin/env bash
# buf breaking: uncommitted proto changes are checked against HEAD; otherwise the
# protos of the last commit that changed them are checked against the version before.
set -euo pipefail
buf=${BUF:-.venv/bin/buf}
if ! git rev-parse --verify -q HEAD >/dev/null; then
  echo "buf breaking: no commit yet, skipped"; exit 0
fi
if ! git diff --quiet HEAD -- protos || [ -n "$(git ls-files --others --exclude-standard protos)" ]; then
  against=HEAD
else
  against=$(git log -2 --format=%H -- protos | sed -n 2p)
  if [ -z "$against" ]; then
    echo "buf breaking: no earlier version of the protos in this clone, skipped"; exit 0
  fi
  current=$(git log -1 --format=%H -- protos)
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  git archive "$current" protos buf.yaml | tar -x -C "$tmp"
  "$buf" breaking "$tmp" --against ".git#ref=$against"
  echo "buf breaking: $current is compatible with $against"; exit 0
fi
"$buf" breaking --against ".git#ref=$against"
echo "buf breaking: working tree is compatible with $against"
