#!/usr/bin/env bash
# Create ./.venv with everything nnunet-compress needs. Idempotent: a second run only re-checks.
#
# Why torch 2.14.1 + torchvision 0.29.1 are installed first and pinned: nnunetv2 needs
# dynamic-network-architectures, which needs timm, which needs torchvision; a plain `pip install nnunetv2`
# would let pip pick the newest torch/torchvision pair from the index (a multi-GB CUDA download). Installing the
# pair explicitly first makes pip reuse it. On machines that keep these wheels on local disk (pip find-links)
# nothing is downloaded. The same build runs on CPU and on CUDA GPUs, so there is no separate GPU route.
# Set NNUNET_COMPRESS_TORCH="torch==X torchvision==Y" to choose another pair (e.g. a CPU-only build on a
# machine where one exists with a matching torchvision).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
TORCH_SPEC=${NNUNET_COMPRESS_TORCH:-"torch==2.14.1 torchvision==0.29.1"}
if ! .venv/bin/python -c "import torch, torchvision" >/dev/null 2>&1; then
  .venv/bin/pip install --quiet $TORCH_SPEC
fi
.venv/bin/pip install --quiet -e ".[test]"
