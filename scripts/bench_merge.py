"""Benchmark `ftcli merge --method svd` against PEFT's add_weighted_adapter(combination_type="svd").

A randomly initialised Llama with SmolLM2-135M's dimensions (hidden 576, intermediate 1536, 30 layers, 9 heads,
3 kv heads, vocab 49152; nothing is downloaded) gets two random rank-64 LoRA adapters over every linear module
(q, k, v, o, gate, up, down: 210 modules), with non-zero B and different alphas (scales 2 and 1). Both tools merge
them at weights 1, 1 to rank 128 (= Σr, exact) and to rank 64 (truncated). Printed: each tool's time, the ratio,
and each tool's max abs error and max relative Frobenius error against the dense float64 reference Σ s_i B_i A_i.

Timed: ftcli's merge arithmetic (merge.merge_loaded on the two adapters in memory) against PEFT's
add_weighted_adapter call on an already loaded model: both in memory, neither counting file reading. ftcli's
reading and writing (what `ftcli merge` adds on top) is printed beside it, and the speed-up with it included.

    python scripts/bench_merge.py [RANKS] [THREADS]    # RANKS comma-separated, default 128,64; THREADS default 1

Both tools run in one process with the settings `ftcli merge` makes (runtime.tune_process: glibc keeps freed memory
in its heap) and the same number of torch threads (default 1: on a shared machine, multi-threaded LAPACK waits
on descheduled threads and the timings swing by 10× and more; pass 2 or more on a quiet machine).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ftcli import merge  # noqa: E402

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
R = 64
CALLS = 7  # ftcli calls per rank (one process: the machine's noise moves a single 0.2 s call by ±15%)


def model_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                       num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                       max_position_embeddings=2048)


def shapes(cfg) -> dict[str, tuple[int, int]]:
    """PEFT module name → (d_out, d_in) of the adapted weight."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    per = {"q_proj": ("self_attn", h, h), "k_proj": ("self_attn", kv, h), "v_proj": ("self_attn", kv, h),
           "o_proj": ("self_attn", h, h), "gate_proj": ("mlp", i, h), "up_proj": ("mlp", i, h),
           "down_proj": ("mlp", h, i)}
    return {f"base_model.model.model.layers.{layer}.{block}.{name}": (d, k)
            for layer in range(cfg.num_hidden_layers) for name, (block, d, k) in per.items()}


def write_adapter(folder: Path, cfg, alpha: float, seed: int) -> None:
    from peft import LoraConfig
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (d, k) in shapes(cfg).items():
        tensors[f"{module}.lora_A.weight"] = torch.randn(R, k, generator=g) / k ** 0.5
        tensors[f"{module}.lora_B.weight"] = torch.randn(d, R, generator=g) * 0.02
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    LoraConfig(r=R, lora_alpha=alpha, target_modules=list(MODULES), task_type="CAUSAL_LM",
               base_model_name_or_path="bench-smollm2-135m-random").save_pretrained(str(folder))


def errors(pairs, ref) -> tuple[float, float]:
    """(max abs error, max relative Frobenius error) of module → (B, A, scale) against module → dense ΔW."""
    worst_abs = worst_rel = 0.0
    for m, d in ref.items():
        B, A, s = pairs[m]
        diff = s * (B.double() @ A.double()) - d
        worst_abs = max(worst_abs, float(diff.abs().max()))
        worst_rel = max(worst_rel, float(diff.norm() / d.norm()))
    return worst_abs, worst_rel


def main() -> None:
    ranks = [int(x) for x in (sys.argv[1] if len(sys.argv) > 1 else "128,64").split(",")]
    torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
    from ftcli.runtime import tune_process

    tune_process()  # the process settings `ftcli merge` makes (glibc's heap thresholds), for both tools alike
    from peft import PeftModel
    from transformers import LlamaForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    cfg = model_config()
    tmp = Path(tempfile.mkdtemp(prefix="bench-merge-"))
    write_adapter(tmp / "a", cfg, alpha=128.0, seed=1)  # scale 2
    write_adapter(tmp / "b", cfg, alpha=64.0, seed=2)  # scale 1
    adapters = [merge.read_adapter(tmp / n) for n in "ab"]
    ref = {m: sum(a.scale(m) * (a.factors[m][1].double() @ a.factors[m][0].double()) for a in adapters)
           for m in adapters[0].factors}
    dims = shapes(cfg)

    # warm the LAPACK/BLAS kernels both tools use, so neither pays first-call set-up inside its timing
    x = torch.randn(256, 128)
    for op in (torch.linalg.svd, torch.linalg.qr, torch.linalg.eigh, torch.linalg.cholesky):
        op(x.T @ x + torch.eye(128) if op in (torch.linalg.eigh, torch.linalg.cholesky) else x)

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = LlamaForCausalLM(cfg)
    peft_model = PeftModel.from_pretrained(model, str(tmp / "a"), adapter_name="a")
    peft_model.load_adapter(str(tmp / "b"), adapter_name="b")
    setup_s = time.perf_counter() - t0
    layers = {n: mod for n, mod in peft_model.named_modules() if hasattr(mod, "lora_A") and "a" in mod.lora_A}

    print(f"bench_merge: 2 random rank-{R} LoRA adapters (scales 2 and 1), {len(dims)} modules "
          f"(SmolLM2-135M shapes: q/o 576×576, k/v 192×576, gate/up 1536×576, down 576×1536), weights 1,1")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus; "
          f"PEFT model set-up {setup_s:.1f} s (not timed below)")
    print(f"{'rank':>5} {'ftcli s':>8} {'(cold s)':>9} {'(+I/O s)':>9} {'PEFT s':>8} {'speed-up':>9} "
          f"{'ftcli max|err|':>15} "
          f"{'PEFT max|err|':>14} {'ftcli rel':>10} {'PEFT rel':>10} {'reported':>9}")
    rows = []
    for rank in ranks:
        out = tmp / f"out-{rank}"
        t = time.perf_counter()
        loaded = [merge.read_adapter(tmp / n) for n in "ab"]
        t1 = time.perf_counter()
        times = []
        for _ in range(CALLS):  # the first call is cold (fresh allocations); the speed-up uses the median
            t2 = time.perf_counter()
            res, tensors = merge.merge_loaded(loaded, "svd", [1.0, 1.0], rank=rank)
            times.append(time.perf_counter() - t2)
        t2 = time.perf_counter()
        merge._write(out, loaded, tensors, merge._output_config(loaded, [m.name for m in res.modules], res.rank), res)
        t3 = time.perf_counter()
        ftcli_cold, ftcli_s, ftcli_io_s = times[0], sorted(times)[CALLS // 2], (t1 - t) + (t3 - t2)
        merged = merge.read_adapter(out)
        ours = {m: (B, A, merged.scale(m)) for m, (A, B, _) in merged.factors.items()}

        name = f"svd{rank}"
        t = time.perf_counter()
        peft_model.add_weighted_adapter(["a", "b"], [1.0, 1.0], name, combination_type="svd", svd_rank=rank)
        peft_s = time.perf_counter() - t
        theirs = {n: (mod.lora_B[name].weight.detach(), mod.lora_A[name].weight.detach(), mod.scaling[name])
                  for n, mod in layers.items()}
        peft_model.delete_adapter(name)

        (oa, orl), (pa, prl) = errors(ours, ref), errors(theirs, ref)
        rows.append({"rank": rank, "ftcli_s": ftcli_s, "ftcli_cold_s": ftcli_cold, "ftcli_io_s": ftcli_io_s,
                     "peft_s": peft_s, "speedup": peft_s / ftcli_s, "speedup_cold": peft_s / ftcli_cold,
                     "speedup_with_io": peft_s / (ftcli_cold + ftcli_io_s),
                     "ftcli_max_abs_err": oa, "peft_max_abs_err": pa, "ftcli_max_rel_err": orl,
                     "peft_max_rel_err": prl, "reported_truncation_error": res.max_error})
        print(f"{rank:>5} {ftcli_s:>8.2f} {ftcli_cold:>9.2f} {ftcli_io_s:>+9.2f} {peft_s:>8.2f} "
              f"{peft_s / ftcli_s:>8.1f}× {oa:>15.3e} "
              f"{pa:>14.3e} {orl:>10.2e} {prl:>10.2e} {res.max_error:>9.2e}")
    cold = ", ".join(f"{r['speedup_cold']:.1f}×" for r in rows)
    with_io = ", ".join(f"{r['speedup_with_io']:.1f}×" for r in rows)
    print(f"ftcli s: the merge arithmetic (merge.merge_loaded), median of {CALLS} calls, comparable with PEFT's single "
          "in-memory call; cold s: ftcli's first call; +I/O s: reading both adapters and writing the output folder; "
          f"speed-up = PEFT s / ftcli s (against the cold call: {cold}; cold call + I/O: {with_io}); rel: max over "
          "modules of "
          "‖ΔW − ref‖_F/‖ref‖_F; reported: ftcli's own truncation-error figure")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
