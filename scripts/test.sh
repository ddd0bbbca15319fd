#!/usr/bin/env bash
# Install (see setup_env.sh) and run the whole test suite, end-to-end nnU-Net tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# pyflakes and the import order (pyproject.toml [tool.ruff]) first: seconds, where a stray import would cost a CI run
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q -rs --durations=15 "$@"
