#!/usr/bin/env bash
# The README's first command on a fresh clone, as a new user runs it: `make demo` in a clean
# checkout (it makes its own venv and installs what it needs), then checks what it printed.
#   scripts/check_quickstart.sh            # about 2-4 min; not part of `make test` (it installs a venv)
set -euo pipefail
src=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
git clone -q "$src" "$dir/layerscope"
cd "$dir/layerscope"
log="$dir/demo.log"
make demo 2>&1 | tee "$log"
grep -q "AVSS per layer (smollm2-135m, 32 examples of chatterbot-conversations)" "$log"
grep -q "layers AVSS would prune" "$log"
grep -q "dashboard: http://127.0.0.1:8000/dashboard#/a/" "$log"
echo "quickstart OK: make demo on a fresh clone printed the AVSS table and the dashboard link"
