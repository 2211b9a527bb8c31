"""q, k and v as one LoRA product (ftcli/strategies/lora_siblings.py) against the three layers one by one, in one
process on the same steps.

Builds the Trainer of `ftcli train` (built-in model, LoRA r=16 on every linear layer, dropout 0, batch 4 packed
alpaca rows, max_len 512), runs 3 warm-up steps, then each of STEPS twice, once with the group and once without
(the order alternating by step), and prints both throughputs and their ratio.

    python scripts/bench_siblings.py [--precision bf16|fp32] [--steps 3,4,...,12]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT))

from profile_step import build_trainer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--steps", default=",".join(str(s) for s in range(3, 13)))
    args = ap.parse_args()
    from ftcli.strategies.lora_fused import FusedLinear

    trainer = build_trainer(args.precision)
    groups = {m: m.siblings for m in trainer.model.modules() if isinstance(m, FusedLinear) and m.siblings}
    for step in range(3):
        trainer.step(step)
    timed = {True: [], False: []}
    for step in (int(s) for s in args.steps.split(",")):
        for on in ((False, True) if step % 2 else (True, False)):
            for m, g in groups.items():
                m.siblings = g if on else None
            t = trainer.step(step)
            timed[on].append((t.seconds, t.tokens))
    rate = {on: sum(n for _, n in v) / sum(s for s, _ in v) for on, v in timed.items()}
    print(f"{args.precision}: {len(groups)} layers in groups; one by one {rate[False]:.1f} tokens/s, grouped "
          f"{rate[True]:.1f} ({rate[True] / rate[False]:.3f}×)")


if __name__ == "__main__":
    main()
