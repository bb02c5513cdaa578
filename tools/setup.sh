#!/usr/bin/env bash
# Set up everything fxfuse needs on a Debian machine; safe to run again.
#   Debian packages: graphviz (draws graphs), dataset-fashion-mnist (demo data),
#                    libjemalloc2 (a faster allocator for CPU training)
#   .venv: torch, torchvision and fxfuse with its test dependencies
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(graphviz dataset-fashion-mnist libjemalloc2)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1 2>&1 | grep -v "^WARNING: Location" || true
fi
.venv/bin/pip install -q -e '.[test]' 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import fxfuse, torch, torchvision, torch_rechub, onnxruntime" 
