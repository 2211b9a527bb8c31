"""DPO on a preference task, ftcli against TRL's DPOTrainer with the same settings, scored alike.

Both train LoRA (r 8, alpha 32, every linear layer) with sigmoid DPO (β 0.1) for STEPS steps of 8 pairs at
learning rate LR (cosine, AdamW, clip 1.0, seed SEED) on 90% of FOLDER/pairs.jsonl: TRL on the first 90%, ftcli
with the check's recipe (`validation: 0.1`, which holds out a seeded random 10%), so the same number of rows, not
the same rows. Then each adapter's implicit reward (log π − log π_ref of the answer and its end-of-turn, through
plain transformers + PEFT, as the check computes it) is compared on FOLDER/held.jsonl's pairs: the share where the
chosen answer's reward beats the rejected one's.

FOLDER holds a model folder `tiny/` (with a chat template) and the two JSONL files of {prompt, chosen, rejected}
rows. The acceptance check of issue 7 builds its own (see docs/objectives.md for the commands). TRL is not one of
ftcli's dependencies: install it beside them (`pip install --no-deps trl`, or into a folder on PYTHONPATH).

    python scripts/dpo_against_trl.py FOLDER [LR] [STEPS] [SEED]    # defaults 0.003 60 0: the acceptance check's recipe
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import torch


def trl_adapter(w: Path, lr: float, steps: int, seed: int, rows: list[dict]) -> Path:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                             "chosen": [{"role": "assistant", "content": r["chosen"]}],
                             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    cfg = DPOConfig(output_dir=str(w / "trl-run"), beta=0.1, learning_rate=lr, max_steps=steps,
                    per_device_train_batch_size=8, lr_scheduler_type="cosine", warmup_steps=max(1, steps * 3 // 100),
                    weight_decay=0.0, max_grad_norm=1.0, seed=seed, logging_steps=10, save_strategy="no", report_to=[],
                    use_cpu=True, disable_tqdm=True)
    peft_cfg = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(w / "tiny"), args=cfg, train_dataset=ds,
                         processing_class=AutoTokenizer.from_pretrained(w / "tiny"), peft_config=peft_cfg)
    trainer.train()
    trainer.model.save_pretrained(w / "trl-adapter")
    return w / "trl-adapter"


def ftcli_adapter(w: Path, lr: float, steps: int, seed: int) -> Path:
    out = w / "ftcli-run"
    recipe = w / "ftcli-dpo.yaml"
    recipe.write_text(f"""base_model: {w / 'tiny'}
strategy: {{name: lora, r: 8, alpha: 32}}
objective: {{name: dpo, beta: 0.1}}
data: {{train: {w / 'pairs.jsonl'}, format: preference, validation: 0.1}}
training: {{max_steps: {steps}, batch_size: 8, lr: {lr}, seed: {seed}}}
output: {out}
""")
    subprocess.run([sys.executable, "-m", "ftcli", "train", str(recipe), "--overwrite"], check=True,
                   stdout=subprocess.DEVNULL)
    return out / "adapter"


def reward_accuracy(w: Path, adapter: Path, rows: list[dict]) -> float:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(w / "tiny")

    def logp(model, prompt: str, answer: str) -> float:
        turn = [{"role": "user", "content": prompt}]
        p = tok.apply_chat_template(turn, add_generation_prompt=True, tokenize=False)
        full = tok.apply_chat_template(turn + [{"role": "assistant", "content": answer}], tokenize=False)
        n = len(tok(p, add_special_tokens=False)["input_ids"])
        x = torch.tensor([tok(full, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            lp = torch.log_softmax(model(x).logits[0, :-1].float(), -1).gather(1, x[0, 1:, None])[:, 0]
        return lp[n - 1 :].sum().item()

    base = AutoModelForCausalLM.from_pretrained(w / "tiny").eval()
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(w / "tiny"), str(adapter)).eval()
    won = 0
    for r in rows:
        chosen = logp(policy, r["prompt"], r["chosen"]) - logp(base, r["prompt"], r["chosen"])
        rejected = logp(policy, r["prompt"], r["rejected"]) - logp(base, r["prompt"], r["rejected"])
        won += chosen > rejected
    return won / len(rows)


def main() -> None:
    w = Path(sys.argv[1]).resolve()
    lr = float(sys.argv[2]) if len(sys.argv) > 2 else 0.003
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 60
    seed = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    pairs = [json.loads(x) for x in (w / "pairs.jsonl").read_text().splitlines() if x.strip()]
    held = [json.loads(x) for x in (w / "held.jsonl").read_text().splitlines() if x.strip()]
    train_rows = pairs[: len(pairs) - math.ceil(len(pairs) * 0.1)]  # as many rows as ftcli's `validation: 0.1` keeps
    results = {"trl": reward_accuracy(w, trl_adapter(w, lr, steps, seed, train_rows), held),
               "ftcli": reward_accuracy(w, ftcli_adapter(w, lr, steps, seed), held)}
    print(f"lr {lr}, {steps} steps × 8 pairs, seed {seed}, {len(held)} held-out pairs: implicit reward accuracy "
          + ", ".join(f"{k} {v:.2f}" for k, v in results.items()))
    print(json.dumps({"lr": lr, "steps": steps, "seed": seed, **results}))


if __name__ == "__main__":
    main()
