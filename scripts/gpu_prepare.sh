#!/usr/bin/env bash
# Prepares, on this (CPU) machine, what scripts/gpu_check.sh needs on a GPU machine without network:
# the embedded SmolLM2's tokenizer and the wheels of the packages that machine lacks, in .gpu/
# (ignored by git through .git/info/exclude; sent with the device tool's `carry: [".gpu"]`).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >> .git/info/exclude
mkdir -p .gpu/whl
.venv/bin/python - <<'PY'
from sphere_pl import load_model_and_tokenizer
_, tok = load_model_and_tokenizer(None)
tok.save_pretrained(".gpu/tokenizer")
print("saved .gpu/tokenizer")
PY
# The GPU image has torch, transformers, lightning, torchmetrics, safetensors, einops, pyarrow, psutil and
# pytest (KINDS.md of the device tool); sphere_pl also imports these. Python 3.12 wheels, no dependencies resolved.
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl \
  datasets==5.2.0 dill multiprocess jsonargparse==4.53.0 docstring-parser typeshed-client transformers==5.23.0 tokenizers==0.23.3
du -sh .gpu
