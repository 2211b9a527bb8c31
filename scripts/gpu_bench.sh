#!/bin/sh
# `make bench` on a lent CUDA machine (issue 15, item 6), prepared by scripts/gpu_pack.sh; from the repository root
# there:  sh scripts/gpu_bench.sh   (results in $OUT, or ./gpu-results without the device tool). BENCH_ARGS is
# added to every bench_train.py call (e.g. BENCH_ARGS="--rows 16 --val-rows 4" to try the script out on a CPU).
# HF Trainer + PEFT against ftcli in bf16 (autocast; ftcli's packed rows through per-example SDPA on CUDA) and fp32,
# LoRA r=16 all-linear; the same in bf16 with dropout 0.05; QLoRA in bf16 where bitsandbytes imports (its own call,
# so that a failure there keeps the LoRA tables); peak GPU memory of each run in the tables. ftcli's runs skip the
# retention probe (--no-retention): it is not timed, and on the random base it would first generate the base's
# answers. Each call's exit status goes to $OUT/status.txt.
set -e
OUT=${OUT:-gpu-results}
mkdir -p "$OUT" /tmp/site
[ -n "$NO_WHEELS" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu/whl/*.whl   # NO_WHEELS=1: trying the script out where the packages are installed
[ -n "$NO_WHEELS" ] || cp -r .gpu/site/. /tmp/site/
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" || echo "no nvidia-smi" > "$OUT/gpu.txt"
cat "$OUT/gpu.txt"
python3 - <<'PY'
import os, shutil, torch
from transformers import AutoConfig, AutoModelForCausalLM
torch.manual_seed(0)
config = AutoConfig.from_pretrained(".gpu/base")
model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
model.save_pretrained("/tmp/base")
for f in os.listdir(".gpu/base"):
    if f != "config.json":
        shutil.copy(f".gpu/base/{f}", "/tmp/base/")
print("random-weight base in /tmp/base:", sum(p.numel() for p in model.parameters()), "parameters")
PY
bench() {  # bench() NAME ARGS...: one bench_train.py call, its table in $OUT/NAME.md, its log beside it
    name=$1; shift
    status=0
    python3 scripts/bench_train.py --base /tmp/base --data .gpu/alpaca --no-retention "$@" $BENCH_ARGS \
        --markdown "$OUT/$name.md" > "$OUT/$name.log" 2>&1 || status=$?
    tail -n 30 "$OUT/$name.log"
    echo "$name: exit $status" | tee -a "$OUT/status.txt"
}
bench bench_gpu --strategies lora --precisions fp32,bf16
bench bench_gpu_dropout --strategies lora --precisions bf16 --dropout 0.05
if python3 -c "import bitsandbytes" 2>/dev/null; then
    bench bench_gpu_qlora --strategies qlora --precisions bf16
else
    echo "bench_gpu_qlora: bitsandbytes does not import" | tee -a "$OUT/status.txt"
fi
