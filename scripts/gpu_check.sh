#!/usr/bin/env bash
# The GPU check of issues 17 and 31, one command of at most ~8 minutes on a GPU machine with PyTorch,
# transformers and Lightning, no network and no hub. Every figure goes under $OUT.
#   here:   bash scripts/gpu_prepare.sh                      (tokenizer and wheels into .gpu/)
#   there:  bash scripts/gpu_check.sh                        (device tool: run, carry [".gpu"], timeout_s 540)
# Random weights with the published shapes (benchmarks/configs): speed depends on shapes, not values.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
if ls .gpu/whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
TOK=.gpu/tokenizer
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, lightning; print('torch', torch.__version__, 'transformers', transformers.__version__, 'lightning', lightning.__version__)"
} > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

step() {  # name, seconds, command...: its output to $OUT/name.log, the tail to the console
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$OUT/$name.log"
  grep -E "passed|failed|error|model:|value search passes|total per edit|phase|value_optimisation|GPU memory|end of fit|tokens/s|set-up" "$OUT/$name.log" | tail -14
}

EDIT="python3 benchmarks/edit_speed.py --tokenizer $TOK --data counterfact --hparams paper --batch 100"
step cuda_tests 90 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py
step llama3_auto 160 $EDIT --random-init llama3-8b --dtype bfloat16 --edits 100 --nullspace-threshold 1e9
# issue 31: the same edits with accelerate's dispatch, at most 10 GiB on the GPU (LLaMA3-8B's upper blocks in CPU memory,
# run on the GPU through the hooks): seconds per edit and peak GPU memory beside llama3_auto's. (The GPU/CPU split's
# exactness, edited weights equal to all-on-GPU, is tests/test_cuda.py's last test.)
step llama3_offload 150 $EDIT --random-init llama3-8b --dtype bfloat16 --edits 100 --nullspace-threshold 1e9 --max-memory-gb 10
step smollm2_auto 40 $EDIT --random-init smollm2-135m --edits 200
step llama3_stats 50 python3 benchmarks/stats_speed.py --random-init llama3-8b --dtype bfloat16 --tokenizer $TOK --samples 256 --batch-size 32
echo "total $SECONDS s; logs in $OUT"
