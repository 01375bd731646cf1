#!/usr/bin/env bash
# Set up the locked environment in .venv (idempotent; a fresh machine needs only pyenv's 3.10.13).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.pyenv/shims:$PATH"
if ! command -v uv >/dev/null 2>&1; then
  python3 -m pip install --quiet uv
fi
[ -x .venv/bin/python ] || uv venv --seed --quiet .venv
uv sync --frozen --quiet
# TensorFlow decides at import whether oneDNN (INC's INT8 kernels) is on: set it at interpreter start.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "import os; os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '1')" > "$site/nano_tfx_env.pth"
