#!/bin/sh
# `make bench` on a lent CUDA machine (issue 15, item 6), prepared by scripts/gpu_pack.sh; from the repository root
# there:  sh scripts/gpu_bench.sh   (results in $OUT, or ./gpu-results without the device tool). BENCH_ARGS is
# added to every bench_train.py call (e.g. BENCH_ARGS="--rows 8 --val-rows 4" to try the script out on a CPU).
# HF Trainer + PEFT against ftcli in bf16 (autocast; ftcli's packed rows through per-example SDPA on CUDA) and fp32,
# LoRA r=16 all-linear, and QLoRA where bitsandbytes is installed there; peak GPU memory of each run in the table.
set -e
OUT=${OUT:-gpu-results}
mkdir -p "$OUT" /tmp/site
[ -n "$NO_WHEELS" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu/whl/*.whl   # NO_WHEELS=1: trying the script out where the packages are installed
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" || echo "no nvidia-smi" > "$OUT/gpu.txt"
cat "$OUT/gpu.txt"
python3 - <<'PY'
import os, shutil, torch
from transformers import AutoConfig, AutoModelForCausalLM
torch.manual_seed(0)
config = AutoConfig.from_pretrained(".gpu/base")
model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
model.save_pretrained("/tmp/base")
for f in os.listdir(".gpu/base"):
    if f != "config.json":
        shutil.copy(f".gpu/base/{f}", "/tmp/base/")
print("random-weight base in /tmp/base:", sum(p.numel() for p in model.parameters()), "parameters")
PY
strategies=lora
python3 -c "import bitsandbytes" 2>/dev/null && strategies=lora,qlora
python3 scripts/bench_train.py --base /tmp/base --data .gpu/alpaca --strategies $strategies --precisions fp32,bf16 \
    $BENCH_ARGS --markdown "$OUT/bench_gpu.md" 2>&1 | tee "$OUT/bench_gpu.log"
python3 scripts/bench_train.py --base /tmp/base --data .gpu/alpaca --strategies lora --precisions bf16 \
    --dropout 0.05 $BENCH_ARGS --markdown "$OUT/bench_gpu_dropout.md" 2>&1 | tee "$OUT/bench_gpu_dropout.log"
