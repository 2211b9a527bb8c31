#!/bin/sh
# Prepare .gpu/ (git-ignored through .git/info/exclude) for scripts/gpu_bench.sh on a lent GPU machine (the
# `device` tool: its image has torch, transformers 5.17, peft and the rest, but no pydantic, no bitsandbytes, no
# model files, and it reaches no network). Run here, from the repository root, after `make setup`:
#
#     sh scripts/gpu_pack.sh          # then: device run "sh scripts/gpu_bench.sh", carry [".gpu"]
#
# .gpu/base   the built-in model's config and tokenizer, no weights (gpu_bench.sh makes random ones of its shape:
#             throughput and memory are the model's, losses are not meaningful)
# .gpu/alpaca the first 96 train and 48 test rows of ../shared/data/alpaca (../shared does not travel)
# .gpu/whl    wheels for Python 3.12 of what the image lacks or has in another version than ours
# .gpu/site   bitsandbytes (for the QLoRA rows), unpacked with only its CPU and CUDA 13 libraries: the whole wheel
#             (43 MB, a library for every CUDA and ROCm version) would not fit the device tool's 64 MiB carry
set -e
PY=${PY:-.venv/bin/python}
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/base .gpu/alpaca .gpu/whl
base=$($PY -c "from ftcli import models; print(models.builtin_folder('smollm2-135m-instruct'))")
for f in config.json generation_config.json tokenizer.json tokenizer_config.json special_tokens_map.json \
         chat_template.jinja; do
    [ -f "$base/$f" ] && cp "$base/$f" .gpu/base/
done
head -n 96 ../shared/data/alpaca/train.jsonl > .gpu/alpaca/train.jsonl
head -n 48 ../shared/data/alpaca/test.jsonl > .gpu/alpaca/test.jsonl
v() { $PY -c "from importlib.metadata import version; print(version('$1'))"; }
for pkg in transformers peft pydantic pydantic_core annotated-types typing-inspection; do
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .gpu/whl "$pkg==$(v $pkg)"
done
bnb=$(mktemp -d)
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    -d "$bnb" "bitsandbytes==$(v bitsandbytes)"
mkdir -p .gpu/site
$PY - "$bnb"/bitsandbytes-*.whl .gpu/site <<'PY'
import re, sys, zipfile
keep = re.compile(r"libbitsandbytes_(cpu|cuda13\d)\.so$")
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extractall(sys.argv[2], [n for n in z.namelist() if not n.endswith(".so") or keep.search(n)])
PY
rm -rf "$bnb"
du -sh .gpu
