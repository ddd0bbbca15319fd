#!/usr/bin/env bash
# Install (see setup_env.sh) and run the end-to-end demo on built-in synthetic CT data:
# data -> nnU-Net plan/preprocess -> tiny training -> compression -> fine-tuning -> prediction -> comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/nnunet-compress demo --workdir "${DEMO_WORKDIR:-demo_work}" "$@"
