#!/usr/bin/env bash
# The peers of benchmarks/llm_peers.py (torchao, llm-compressor with compressed-tensors) in their own
# venv: they pin a transformers that is not qpass's, and qpass is never installed there (the peers
# read only the FP32 folder and token rows that `llm_generate.py --peers` writes). Not part of CI.
#   benchmarks/peers_install.sh [VENV]      # default /work/peers-venv (what llm_generate.py calls)
set -euo pipefail
VENV=${1:-/work/peers-venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q torch==2.13.0
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==2.13.0" >"$CONSTRAINTS"
"$VENV/bin/python" -m pip install -q llmcompressor torchao gguf -c "$CONSTRAINTS"
"$VENV/bin/python" -c "import torch, torchao, llmcompressor, compressed_tensors, transformers as t; \
print('torch', torch.__version__, 'torchao', torchao.__version__, 'llmcompressor', llmcompressor.__version__, \
'compressed-tensors', compressed_tensors.__version__, 'transformers', t.__version__)"
