"""Run by tests/test_distributed.py under torchrun (every rank runs it): the jobs of a JSON file, one after another
in one process group, so that one launch (a few seconds of start-up per process) serves many checks.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist_worker.py JOBS.json

Jobs ({"kind": ...}):
- train: `train.run` on a recipe; optionally `resume`, `signal` {"rank", "step", "name"} sent to that rank's own
  process after that step (SIGINT: the run stops at the same step on every rank; SIGKILL: the launch dies),
  `rows` (a path: each rank writes the training rows it used per step, by index), `held` (a path: each rank
  writes the trainable tensors it holds at the end).
- roundtrip: rank-tagged values in every rank's share of the trainable parameters, saved as a checkpoint and as
  the artifact, then restored into the sharded model (see `roundtrip`).
- cli: `ftcli ARGS` through the CLI's `main()` (what `torchrun -m ftcli` runs), expecting exit code `expect_code`.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path


def train_job(job: dict, world) -> None:
    import torch
    from safetensors.torch import save_file

    from ftcli import recipe as recipe_mod
    from ftcli import train
    from ftcli.errors import RunError

    r = recipe_mod.load(job["recipe"])
    hooks = train.Hooks()
    sig = job.get("signal")
    if sig and sig["rank"] == world.rank:
        def send(step, loss):
            if step == sig["step"]:
                os.kill(os.getpid(), getattr(signal, sig["name"]))
        hooks.after_step.append(send)
    if job.get("held"):
        def held(model):
            save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad},
                      f"{job['held']}.{world.rank}")
        hooks.at_end.append(held)
    seen: list = []
    if job.get("rows"):
        original = train.Trainer.micro_batches

        def recording(self, step):
            batches = original(self, step)
            index = {id(e): i for i, e in enumerate(self.setup.data.train.encoded)}
            seen.append([step, [index[id(s)] for b in batches for s in b.sequences]])
            return batches
        train.Trainer.micro_batches = recording
    try:
        train.run(r, output=Path(r.output), resume=job.get("resume", False), hooks=hooks, progress=False)
    except RunError as e:
        if not job.get("expect_error"):
            raise
        assert job["expect_error"] in str(e), str(e)
    finally:
        if job.get("rows"):
            train.Trainer.micro_batches = original
            Path(f"{job['rows']}.{world.rank}").write_text(json.dumps(seen))
    del torch


def tag(rank: int, shape) -> "object":
    """The values rank `rank` writes into its share of shape `shape`: unique per rank and position."""
    import torch

    n = 1
    for d in shape:
        n *= d
    return ((rank + 1) * 1000 + torch.arange(n, dtype=torch.float32) / 1000).reshape(shape)


def roundtrip(job: dict, world) -> None:
    """Every rank fills its share of every trainable tensor with rank-tagged values; the whole tensors these make
    (each rank's share in rank order along dimension 0, as FSDP shards) are written by rank 0 to `expected`; the
    run is saved as a checkpoint and an artifact (what the test compares with `expected`, element by element);
    then every share is zeroed, the checkpoint restored, and each rank checks it holds its own values again, and the
    optimiser state it had."""
    import torch
    from safetensors.torch import save_file
    from torch.distributed.tensor import DTensor

    from ftcli import atomic, distributed
    from ftcli import recipe as recipe_mod
    from ftcli import train

    r = recipe_mod.load(job["recipe"])
    folder, _ = train.open_run_folder(r, Path(r.output), resume=False, overwrite=True)
    setup = train.build(r, run_dir=None, log=lambda *a: None, processes=world.size)
    trainer = train.Trainer(setup, folder)
    trainer.step(0)  # optimiser state to round-trip as well
    shapes = {}
    with torch.no_grad():
        for name, p in trainer.named:
            local = p.to_local() if isinstance(p, DTensor) else p
            local.copy_(tag(world.rank, local.shape))
            shapes[name] = tuple(local.shape)
    every = distributed.gather_objects(shapes)
    expected = {name: torch.cat([tag(rank, every[rank][name]) for rank in range(world.size)])
                for name in shapes}
    state = train.TrainState(step=1, processes=world.size)
    trainer.save_checkpoint(state)
    whole = trainer.parallel.full_state_dict()
    if world.main:
        save_file(expected, job["expected"])
        with atomic.folder(folder.path / setup.strategy.artifact) as tmp:
            setup.strategy.save(trainer.model, tmp, whole)
    moments = {id(p): {k: (v.to_local() if isinstance(v, DTensor) else v).clone()
                       for k, v in trainer.optimizer.state[p].items() if torch.is_tensor(v) and v.ndim}
               for _, p in trainer.named}
    with torch.no_grad():
        for _, p in trainer.named:
            (p.to_local() if isinstance(p, DTensor) else p).zero_()
            for v in trainer.optimizer.state[p].values():
                if torch.is_tensor(v) and v.ndim:
                    (v.to_local() if isinstance(v, DTensor) else v).zero_()
    trainer.restore(1)
    for name, p in trainer.named:
        local = p.to_local() if isinstance(p, DTensor) else p
        assert torch.equal(local, tag(world.rank, shapes[name])), f"rank {world.rank}: {name} not restored"
        for k, v in trainer.optimizer.state[p].items():
            if torch.is_tensor(v) and v.ndim:
                mine = v.to_local() if isinstance(v, DTensor) else v
                assert torch.equal(mine, moments[id(p)][k]), f"rank {world.rank}: {name} {k} not restored"


def cli(job: dict, world) -> None:
    from ftcli.cli import main as ftcli_main

    sys.argv = ["ftcli", *job["args"]]
    try:
        ftcli_main()
        code = 0
    except SystemExit as e:
        code = e.code
    assert code == job["expect_code"], f"rank {world.rank}: exit {code}"


def main(jobs_file: str) -> None:
    from ftcli import distributed
    from ftcli.logs import quiet

    quiet()
    world = distributed.init()
    for n, job in enumerate(json.loads(Path(jobs_file).read_text())):
        # one write per line: the ranks share the pipe, and print() writes the text and the newline apart
        sys.stderr.write(f"rank {world.rank}: <job {n}>\n")  # where each job's messages start
        sys.stderr.flush()
        {"train": train_job, "roundtrip": roundtrip, "cli": cli}[job["kind"]](job, world)
        sys.stdout.write(f"rank {world.rank}: <done {n}>\n")
        sys.stdout.flush()
    distributed.close()


if __name__ == "__main__":
    main(sys.argv[1])
