#!/usr/bin/env bash
# The two entry points of the README:
#   bash tools/run.sh main   set up, then run the main job on real data
#   bash tools/run.sh test   set up, then run the test suite
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh

# CPU training spends much of its time in page faults with glibc's allocator.
jemalloc=$(ls /usr/lib/*/libjemalloc.so.2 2>/dev/null | head -n 1 || true)
if [ -n "$jemalloc" ]; then
  export LD_PRELOAD="$jemalloc"
  export MALLOC_CONF="dirty_decay_ms:-1,muzzy_decay_ms:-1"
fi

case "${1:-}" in
  main) shift; exec .venv/bin/python examples/main.py "$@" ;;
  test) shift; exec .venv/bin/python -m pytest "$@" ;;
  *) echo "usage: bash tools/run.sh main|test [args]" >&2; exit 2 ;;
esac
