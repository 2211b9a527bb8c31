"""Several processes (2, gloo, one thread each) on the tiny model: what one process computes with the global batch is
what two compute (DDP and FSDP2), every row once per epoch, whole tensors saved and restored, kill + --resume.

Multi-process runs go through torchrun as users start them: `ftcli train --nproc 2`, `torchrun -m ftcli train`, and
tests/dist_worker.py (train.run under torchrun) which runs many jobs in one launch, since each launch costs seconds
of start-up per process. The single-process references run in this process.

The training rows are 13 (validation rows in a file of their own), so with 2 processes × batch 2 an epoch ends with
a step of one row: one rank has nothing and runs a pass that counts zero; with accumulation 2 the last step's
micro-batches are 4 and 1 rows, so the ranks run different numbers of passes (FSDP needs them equal). Runs of 5
steps (4 with accumulation: two epochs) cross those steps.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ftcli import recipe as recipe_mod
from ftcli import train
from ftcli.data.batching import plan_epoch, shard_step
from ftcli.errors import UserError

from conftest import make_recipe, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "dist_worker.py"
TOL = 1e-5


def rows(n: int, seed: int) -> list[dict]:
    """Answers of very different lengths (so micro-batches hold different numbers of trained tokens)."""
    rng = random.Random(seed)
    words = "one two three four five six seven eight nine".split()
    return [{"instruction": f"count to {k} (row {i})", "input": "", "output": " ".join(words[:k])}
            for i, k in enumerate(rng.randint(1, 9) for _ in range(n))]


def pairs(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": f"what is {a} + {b}", "chosen": f"{a + b}", "rejected": f"the answer is {a + b} , I think"}
            for a, b in ((rng.randint(0, 9), rng.randint(0, 9)) for _ in range(n))]


def teacher(folder: Path) -> Path:
    import make_tiny_model

    return make_tiny_model.build_teacher(folder)


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def torchrun(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           *map(str, args)], env=env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def ftcli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ftcli", *map(str, args)], env=env(), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def train_losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if '"train"' in line]


def artifact(run_dir: Path) -> dict:
    folder = run_dir / ("adapter" if (run_dir / "adapter").is_dir() else "model")
    return load_file(str(next(folder.glob("*.safetensors"))))


def assert_same_run(one: Path, two: Path, tol: float = TOL) -> None:
    a, b = train_losses(one), train_losses(two)
    assert len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) < tol, (a, b)
    wa, wb = artifact(one), artifact(two)
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst < tol, worst
    assert not [k for k in wb if "lora_B" in k and wb[k].abs().max() == 0]


# ------------------------------------------------------------------------------------------------------------
# the plan, dealt out (no processes needed)


@pytest.mark.parametrize("n,batch,accum,procs,bucket", [(29, 2, 1, 2, False), (29, 2, 2, 2, True), (30, 3, 2, 4, True),
                                                       (7, 4, 1, 2, False), (1, 1, 1, 3, True)])
def test_every_row_once_per_epoch_across_ranks(n, batch, accum, procs, bucket):
    lengths = [random.Random(i).randint(5, 60) for i in range(n)]
    for epoch in range(2):
        plan = plan_epoch(lengths, batch * procs, accum, 0, epoch, bucket)
        seen = Counter(i for step in plan for rank in range(procs) for mb in shard_step(step, rank, procs)
                       for i in mb)
        assert seen == Counter(range(n))
        for step in plan:  # no rank takes more than the per-process batch into one micro-batch
            assert all(len(mb) <= batch for rank in range(procs) for mb in shard_step(step, rank, procs))
    # the plan for one process with the global batch is the plan being dealt out: the same rows in the same steps
    one = plan_epoch(lengths, batch * procs, accum, 0, 0, bucket)
    assert [sorted(i for mb in s for i in mb) for s in one] == [
        sorted(i for r in range(procs) for mb in shard_step(s, r, procs) for i in mb) for s in one]


# ------------------------------------------------------------------------------------------------------------
# one launch, many jobs


# full fine-tuning at lr 1e-3: at 1e-2 AdamW turns float-rounding differences in near-zero gradients into
# 1e-5 differences of single weights (one element of 16k, measured), whatever the number of processes
CASES = {  # name → (strategy, training overrides, distributed mode)
    "ddp-lora-accum": ({"name": "lora", "r": 4, "alpha": 8}, {"grad_accum": 2, "max_steps": 4}, "ddp"),
    "ddp-full-accum": ({"name": "full"}, {"grad_accum": 2, "max_steps": 4, "lr": 1e-3}, "ddp"),
    "fsdp-lora": ({"name": "lora", "r": 4, "alpha": 8}, {}, "fsdp"),
    "fsdp-full-accum": ({"name": "full"}, {"grad_accum": 2, "max_steps": 4, "lr": 1e-3}, "fsdp"),
    "fsdp-hft": ({"name": "hft", "round_steps": 2}, {}, "fsdp"),
    "fsdp-dora": ({"name": "dora", "r": 4, "alpha": 8}, {}, "fsdp"),
    "fsdp-frozen": ({"name": "frozen", "last_n_blocks": 1}, {}, "fsdp"),
    "ddp-ewc": ({"name": "ewc", "lambda": 50.0, "fisher_rows": 4, "inner": {"name": "lora", "r": 4, "alpha": 8}}, {},
                "ddp"),
    # objectives: dpo (pairs; the reference is the adapter switched off, a forward inside the step) and distill
    "ddp-dpo": ({"name": "lora", "r": 4, "alpha": 8}, {}, "ddp"),
    "fsdp-dpo": ({"name": "lora", "r": 4, "alpha": 8}, {}, "fsdp"),
    "fsdp-distill": ({"name": "lora", "r": 4, "alpha": 8}, {}, "fsdp"),
}
QLORA = {mode: ({"name": "qlora", "r": 4, "alpha": 8}, {}, mode) for mode in ("ddp", "fsdp")}
BF16 = {mode: ({"name": "lora", "r": 4, "alpha": 8}, {"precision": "bf16"}, mode) for mode in ("ddp", "fsdp")}
EVALS = ("fsdp-lora", "cli-lora")  # runs with every kind of metric, in validation and retention sets
ROWS = {"ddp-lora-accum": (2, 2), "fsdp-lora": (4, 1)}  # name → (steps per epoch, whole epochs in the run)
RESUMED = {"ddp": ({"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1}, {"checkpoint_every": 2, "max_steps": 6}),
           "fsdp": ({"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1}, {"checkpoint_every": 2, "max_steps": 6})}


class Bench:
    """Builds recipes for the tiny model in one folder: `recipe(name, processes, ...)`."""

    def __init__(self, root: Path, model: Path):
        self.root, self.model = root, model
        self.train = write_jsonl(root / "train.jsonl", rows(13, 0))
        self.val = write_jsonl(root / "val.jsonl", rows(5, 1))  # 5 and 7 rows: the ranks' shares differ
        self.pairs = write_jsonl(root / "pairs.jsonl", pairs(13, 0))
        self.pairs_val = write_jsonl(root / "pairs-val.jsonl", pairs(5, 1))
        self.teacher = teacher(root / "teacher")
        self.mc = write_jsonl(root / "mc.jsonl", [{"question": f"which comes {i} ?", "choices": ["one", "two", "three"],
                                                   "answer": i % 3} for i in range(7)])

    def recipe(self, name: str, processes: int, strategy: dict, training: dict, mode: str = "ddp") -> Path:
        folder = self.root / f"{name}-{processes}"
        folder.mkdir(parents=True, exist_ok=True)
        data, objective = self.train, {}
        if name.endswith("-dpo"):
            data, objective = self.pairs, {"objective": {"name": "dpo"}}
        elif name.endswith("-distill"):
            objective = {"objective": {"name": "distill", "teacher": str(self.teacher), "alpha": 0.5}}
        evals = {"metrics": ["loss"]} if data == self.pairs else {}
        if name in EVALS:  # every sharded metric path: the objective's loss, generation, candidates, retention loss
            evals = {"metrics": ["loss", "perplexity", "exact_match"], "max_new_tokens": 4,
                     "retention": [{"data": str(self.mc), "format": "choice", "metric": "choice"},
                                   {"data": str(self.train), "format": "alpaca", "metric": "loss", "limit": 7}]}
        return make_recipe(folder, self.model, data, strategy=strategy, **objective,
                           data={"validation": str(self.pairs_val if data == self.pairs else self.val),
                                 "format": "preference" if data == self.pairs else "alpaca", "packing": True},
                           training={"max_steps": 5, "batch_size": 4 // processes, "lr": 1e-2, "seed": 0,
                                     "distributed": mode, **training}, **({"eval": evals} if evals else {}))

    def run_dir(self, name: str, processes: int) -> Path:
        return self.root / f"{name}-{processes}" / "run"


@pytest.fixture(scope="module")
def bench(tmp_path_factory, tiny_model_dir):
    return Bench(tmp_path_factory.mktemp("dist"), tiny_model_dir)


@pytest.fixture(scope="module")
def launch(bench):
    """The worker's launch: every case on 2 processes, the rows record, the FSDP interrupt + resume, round trips,
    and the straight DDP run the kill test compares with."""
    jobs = []
    for name, (strategy, training, mode) in [*CASES.items(), *((f"{m}-qlora", c) for m, c in QLORA.items()),
                                             *((f"{m}-bf16-dpo", c) for m, c in BF16.items())]:
        job = {"kind": "train", "recipe": str(bench.recipe(name, 2, strategy, training, mode))}
        if name in ROWS:
            job["rows"] = str(bench.root / f"{name}.rows")
        if mode == "ddp":
            job["held"] = str(bench.root / f"{name}.held")
        jobs.append(job)
    for mode, (strategy, training) in RESUMED.items():
        straight = bench.recipe(f"straight-{mode}", 2, strategy, training, mode)
        jobs.append({"kind": "train", "recipe": str(straight)})
        if mode == "fsdp":
            path = bench.recipe("interrupted-fsdp", 2, strategy, training, mode)
            jobs.append({"kind": "train", "recipe": str(path), "signal": {"rank": 1, "step": 3, "name": "SIGINT"},
                         "expect_error": "at step 3; checkpoint step-3 written"})
            jobs.append({"kind": "train", "recipe": str(path), "resume": True})
    for name, strategy in (("roundtrip-lora", {"name": "lora", "r": 1, "alpha": 2}), ("roundtrip-full", {"name": "full"})):
        path = bench.recipe(name, 2, strategy, {}, "fsdp")
        jobs.append({"kind": "roundtrip", "recipe": str(path), "expected": str(bench.root / f"{name}.expected")})
    # `ftcli train` as typed (main()), on a run folder that exists: exit 2, the message once
    jobs.append({"kind": "cli", "args": ["train", str(bench.recipe("straight-ddp", 2, *RESUMED["ddp"], "ddp"))],
                 "expect_code": 2})
    # last, as it ends the launch: SIGKILL on rank 1 after step 3 (the kill test resumes it)
    jobs.append({"kind": "train", "recipe": str(bench.recipe("killed-ddp", 2, *RESUMED["ddp"], "ddp")),
                 "signal": {"rank": 1, "step": 3, "name": "SIGKILL"}})
    spec = bench.root / "jobs.json"
    spec.write_text(json.dumps(jobs))
    done = torchrun(WORKER, spec)
    bench.launch_output = done
    assert done.returncode != 0  # the kill
    finished = [n for n in range(len(jobs)) if f"rank 0: <done {n}>" in done.stdout]
    assert finished == list(range(len(jobs) - 1)), done.stdout[-3000:] + done.stderr[-6000:]
    return bench


def reference(bench: Bench, name: str) -> Path:
    """The 1-process run of a case: batch 4 (the global batch of 2 processes × 2), in this process."""
    strategy, training, mode = CASES[name]
    path = bench.recipe(name, 1, strategy, training, mode)
    if not (bench.run_dir(name, 1) / "report.json").is_file():
        r = recipe_mod.load(path)
        train.run(r, output=Path(r.output), progress=False)
    return bench.run_dir(name, 1)


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_equal_one_with_the_global_batch(launch, name):
    assert_same_run(reference(launch, name), launch.run_dir(name, 2))


@pytest.mark.distributed
def test_qlora_trains_sharded_and_replicated_alike(launch):
    """qlora under FSDP2: bitsandbytes' packed 4-bit weights are sharded like any other (it recovers each layer's
    quantisation state from the module) and the run equals DDP's. Against one process the tolerance is wider, as
    the 4-bit CPU kernels round differently with the batch's shape: in one process, 2 × accumulation 2 differs
    from batch 4 by about 2e-5 in the loss too (measured)."""
    assert_same_run(launch.run_dir("ddp-qlora", 2), launch.run_dir("fsdp-qlora", 2))
    strategy, training, _ = QLORA["ddp"]
    path = launch.recipe("qlora", 1, strategy, training)
    r = recipe_mod.load(path)
    train.run(r, output=Path(r.output), progress=False)
    assert_same_run(launch.run_dir("qlora", 1), launch.run_dir("fsdp-qlora", 2), tol=1e-3)


def assert_same_scores(one: Path, two: Path) -> None:
    a, b = (json.loads((d / "report.json").read_text()) for d in (one, two))
    for when in ("before", "after"):
        assert a[when].keys() == b[when].keys() and "exact_match" in a[when]
        for k, v in a[when].items():
            if isinstance(v, float) and k != "rows_per_s":
                assert b[when][k] == pytest.approx(v, rel=1e-6, abs=1e-6), (when, k)
    assert [(r["name"], r["rows"]) for r in a["retention"]] == [(r["name"], r["rows"]) for r in b["retention"]]
    for ra, rb in zip(a["retention"], b["retention"]):
        assert (rb["before"], rb["after"]) == pytest.approx((ra["before"], ra["after"]), rel=1e-6, abs=1e-6), ra["name"]


@pytest.mark.distributed
def test_sharded_validation_and_retention_score_as_one_process(launch):
    """Validation (loss, perplexity, exact match by generation) and retention sets (choice accuracy, loss) are
    scored by each rank on its share of the rows, with FSDP's parameters gathered, and equal one process's."""
    assert_same_scores(reference(launch, "fsdp-lora"), launch.run_dir("fsdp-lora", 2))


@pytest.mark.distributed
def test_bf16_trains_sharded_and_replicated_alike(launch):
    """bf16 autocast (DPO: the reference forward with the adapter off runs in the step's precision, FSDP's first
    forward too): FSDP2 equals DDP, and both equal one process with the global batch, as the adapter's gradients
    are summed in float32 (lora_fused.py; summed in bf16, one process differed by 2.4e-5 in the loss here)."""
    assert_same_run(launch.run_dir("ddp-bf16-dpo", 2), launch.run_dir("fsdp-bf16-dpo", 2))
    strategy, training, mode = BF16["ddp"]
    r = recipe_mod.load(launch.recipe("ddp-bf16-dpo", 1, strategy, training, mode))
    train.run(r, output=Path(r.output), progress=False)
    assert_same_run(launch.run_dir("ddp-bf16-dpo", 1), launch.run_dir("ddp-bf16-dpo", 2))


@pytest.mark.distributed
def test_the_saved_weights_are_what_every_rank_holds(launch):
    for name in ("ddp-lora-accum", "ddp-full-accum"):
        saved = artifact(launch.run_dir(name, 2))
        for rank in range(2):
            held = load_file(str(launch.root / f"{name}.held.{rank}"))
            assert len(held) >= len(saved) > 0
            for key, value in held.items():  # PEFT drops the adapter name from its keys
                assert torch.equal(saved[key.replace(".default.", ".")], value), (name, rank, key)


@pytest.mark.distributed
def test_each_row_is_trained_once_per_epoch_across_ranks(launch):
    for name, (per_epoch, epochs) in ROWS.items():
        used: Counter = Counter()
        for rank in range(2):
            for step, indices in json.loads((launch.root / f"{name}.rows.{rank}").read_text()):
                if step < epochs * per_epoch:
                    used.update((step // per_epoch, i) for i in indices)
        assert used == Counter({(epoch, i): 1 for epoch in range(epochs) for i in range(13)}), name


@pytest.mark.distributed
def test_sharded_state_round_trips_through_checkpoints_and_artifacts(launch, tiny_model_dir):
    """Rank-tagged shares (FSDP): the checkpoint and the artifact hold every rank's values, element by element
    (LoRA r=1: one rank's share of lora_A is empty), and a fresh model loading the artifact holds them too. The
    worker checked the restore into the sharded model (values and optimiser moments)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for name in ("roundtrip-lora", "roundtrip-full"):
        expected = load_file(str(launch.root / f"{name}.expected"))
        run_dir = launch.run_dir(name, 2)
        saved = load_file(str(run_dir / "checkpoints" / "step-1" / "trainable.safetensors"))
        assert saved.keys() == expected.keys()
        for k in expected:
            assert torch.equal(saved[k], expected[k]), k
        if name == "roundtrip-lora":
            assert any(v.shape[0] == 1 for k, v in expected.items() if "lora_A" in k)  # rank 1's share: empty
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)),
                                              str(run_dir / "adapter"))
        else:
            model = AutoModelForCausalLM.from_pretrained(str(run_dir / "model"))
        fresh = dict(model.named_parameters())
        for k, v in expected.items():
            key = k if k in fresh else k.removeprefix("base_model.model.")
            assert torch.equal(fresh[key].detach(), v), k


@pytest.mark.distributed
def test_interrupt_on_one_rank_stops_both_and_resume_is_exact(launch):
    """SIGINT reached rank 1 only, after step 3: both ranks stopped there, checkpointed, and the resumed FSDP run
    equals the uninterrupted one."""
    resumed = launch.run_dir("interrupted-fsdp", 2)
    report = json.loads((resumed / "report.json").read_text())
    assert report["run"]["resumed_from"] == 3
    assert_same_run(launch.run_dir("straight-fsdp", 2), resumed, tol=1e-6)


@pytest.mark.distributed
def test_kill_and_resume_on_two_processes_equals_the_uninterrupted_run(launch):
    """SIGKILL on rank 1 after step 3 ended the worker's launch (checkpoint at step 2); `ftcli train --nproc 2
    --resume` continues it to the same losses and adapter as the uninterrupted 2-process run."""
    path = launch.recipe("killed-ddp", 2, *RESUMED["ddp"], "ddp")
    run_dir = launch.run_dir("killed-ddp", 2)
    assert not (run_dir / "adapter").exists()
    assert (run_dir / "checkpoints" / "step-2" / "state.json").is_file()
    done = ftcli("train", path, "--resume", "--nproc", "2")
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("run folder") == 1
    assert json.loads((run_dir / "report.json").read_text())["run"]["resumed_from"] == 2
    assert_same_run(launch.run_dir("straight-ddp", 2), run_dir, tol=1e-6)
    # another process count would deal the rows out differently: refused before anything loads
    r = recipe_mod.load(path, ["training.max_steps=8"])
    with pytest.raises(UserError, match=r"trained on 2 process\(es\).*--nproc 2"):
        train.run(r, output=Path(r.output), resume=True, progress=False)


@pytest.mark.distributed
def test_torchrun_m_ftcli_trains_like_one_process_and_writes_one_run_folder(bench):
    """`torchrun -m ftcli train` as users type it: LoRA, 2 × batch 2 = 1 × batch 4; one summary; the report names
    the processes and the global batch."""
    strategy, training, _ = CASES["fsdp-lora"]
    path = bench.recipe("cli-lora", 2, strategy, training, "ddp")
    done = torchrun("-m", "ftcli", "train", path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("run folder") == 1
    assert_same_run(reference(bench, "fsdp-lora"), bench.run_dir("cli-lora", 2))  # 1 process: the mode is moot
    assert_same_scores(reference(bench, "fsdp-lora"), bench.run_dir("cli-lora", 2))
    report = json.loads((bench.run_dir("cli-lora", 2) / "report.json").read_text())
    assert (report["run"]["processes"], report["run"]["global_batch"], report["run"]["distributed"]) == (2, 4, "ddp")
    assert len(report["throughput"]["peak_rss_mb_per_process"]) == 2
    md = (bench.run_dir("cli-lora", 2) / "report.md").read_text()
    assert "2 processes (ddp), global batch 4" in md and "peak RSS per process" in md


@pytest.mark.distributed
def test_an_error_on_every_rank_is_said_once(launch):
    """The worker ran `ftcli train` (the CLI's main) on both ranks on a run folder that exists: both exit 2, one
    message, no traceback."""
    jobs = json.loads((launch.root / "jobs.json").read_text())
    n = next(i for i, job in enumerate(jobs) if job["kind"] == "cli")
    err = launch.launch_output.stderr
    start = min(err.index(f"rank {r}: <job {n}>") for r in range(2))
    err = err[start : max(err.index(f"rank {r}: <job {n + 1}>") for r in range(2))]  # either rank may say it
    assert err.count("already exists") == 1 and "Traceback" not in err, err


# ------------------------------------------------------------------------------------------------------------
# check: the plan for N processes (no processes started)


def test_check_plans_for_n_processes(tmp_path, tiny_model_dir, run_cli):
    """`ftcli check --nproc 2`: the global batch and the steps of 2 processes; with fsdp the weights, gradients and
    AdamW state per process are halved; ewc cannot be sharded: refused before any weight loads."""
    from ftcli import plan

    data = write_jsonl(tmp_path / "d.jsonl", rows(40, 0))
    path = make_recipe(tmp_path, tiny_model_dir, data, strategy={"name": "full"},
                       training={"max_steps": None, "epochs": 1, "batch_size": 2, "grad_accum": 2,
                                 "distributed": "fsdp"}, data={"validation": None})
    code, out, err = run_cli("check", path, "--nproc", "2")
    assert code == 0, err
    assert "global batch: 8 rows per step = batch_size 2 × grad_accum 2 × 2 processes (fsdp)" in out
    r = recipe_mod.load(path)
    one, two = (plan.build(r, log=lambda *a: None, processes=n) for n in (1, 2))
    assert (one.steps, two.steps) == (10, 5)
    for part in ("weights", "gradients", "optimizer (AdamW)"):
        assert two.memory[part] == pytest.approx(one.memory[part] / 2)
    assert two.memory["activations (upper bound)"] == one.memory["activations (upper bound)"]
    ewc = make_recipe(tmp_path, tiny_model_dir, data, strategy={"name": "ewc", "inner": {"name": "lora"}},
                      training={"distributed": "fsdp"})
    code, out, err = run_cli("check", ewc)
    assert code == 2 and "training.distributed fsdp with strategy ewc" in err and "ddp" in err


def test_the_relaunched_command_loses_only_nproc():
    from ftcli.distributed import strip_nproc

    assert strip_nproc(["--debug", "train", "r.yaml", "--nproc", "2", "--set", "a=1"]) == [
        "--debug", "train", "r.yaml", "--set", "a=1"]
    assert strip_nproc(["train", "r.yaml", "--nproc=4", "--resume"]) == ["train", "r.yaml", "--resume"]
