#!/usr/bin/env bash
# Create .venv and install fineserve (with the test tools) into it.
#
# torch goes in first, pinned, so nothing else can pull another build: `pip install torch==2.13.0`
# takes the CPU wheel on machines that provide one locally and the CUDA build from PyPI on a GPU
# box. On another CPU-only machine, set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu to
# avoid downloading the CUDA libraries.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages, where this machine allows: a real Prometheus for the canary-analysis test,
# and g++ for torch.compile (the predictor compiles bfloat16 on a CPU; its tests compile).
apt_install() {  # PACKAGE COMMAND WHY
  command -v "$2" >/dev/null 2>&1 && return
  command -v apt-get >/dev/null 2>&1 || { echo "WARNING: no $1 and no apt-get; $3" >&2; return; }
  local apt=(apt-get)
  [ "$(id -u)" = 0 ] || apt=(sudo -n apt-get)
  export DEBIAN_FRONTEND=noninteractive
  "${apt[@]}" install -y -qq "$1" >/dev/null 2>&1 \
    || { "${apt[@]}" update -qq >/dev/null 2>&1 && "${apt[@]}" install -y -qq "$1" >/dev/null 2>&1; } \
    || echo "WARNING: could not install $1 (apt-get install $1); $3" >&2
}
apt_install prometheus prometheus "the canary analysis test needs it"
apt_install g++ g++ "torch.compile needs it (the compiled-serving tests)"
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" "torch==${TORCH_VERSION:-2.13.0}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
"${pip[@]}" -c constraints.txt -e ".[dev]"
# The control plane the KServe tests run against (docs/control-plane.md), built from Go modules
# and cached outside the repository: minutes the first time on a machine, seconds after. Without
# Go those tests skip.
if command -v go >/dev/null 2>&1; then
  bash scripts/build-control-plane.sh >/dev/null
else
  echo "WARNING: no Go toolchain; the tests against the real control plane will be skipped" >&2
fi
.venv/bin/python -c "import torch, fineserve; print('fineserve ready: torch', torch.__version__, \
'cuda' if torch.cuda.is_available() else 'cpu')"
