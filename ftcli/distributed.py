"""One run on several processes: launching under torchrun, the process group, and the few collective operations the
run needs beside the gradient's (which DDP or FSDP2 do: ftcli/parallel.py).

- `ftcli train RECIPE --nproc N` re-runs the same command under `torch.distributed.run` (torchrun) as
  `torchrun --standalone --nproc-per-node N -m ftcli train RECIPE ...`; launching that by hand, with torchrun's
  multi-node flags, or under Slurm (`srun torchrun ...`) is the same run (docs/distributed.md).
- `init()` joins the process group torchrun describes in the environment (gloo on CPUs, NCCL on CUDA); in one
  process everything here is a no-op, so `ftcli eval` and single-process training never touch torch.distributed.
- `shard` / `gather` split a list across ranks (interleaved: rank r takes items r, r+N, ...) and put the results
  back in the list's order on every rank; `all_sum` adds numbers across ranks in float64.
- `first_failure()`: the first rank to fail prints the message; the others, failing because it did, stay quiet.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

ERROR_KEY = "ftcli/failures"


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """Is this process one of several started by torchrun (or a launcher that sets the same environment)?"""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def world() -> World:
    if not _initialized():
        return World()
    import torch.distributed as dist

    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def init() -> World:
    """Join the process group of a torchrun launch (once); a single process stays out of torch.distributed."""
    if launched() and not _initialized():
        import torch
        import torch.distributed as dist

        if torch.cuda.is_available():  # NCCL for CUDA tensors; gloo still carries the loop's small CPU numbers
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    return world()


def close() -> None:
    """Leave the process group together. Without the barrier a rank was sometimes aborted at exit after a finished
    run ("terminate called without an active exception", SIGABRT: 2 of 8 runs of tests/test_distributed.py on
    2026-11-30, 0 of 8 with it); likely cause: one rank destroyed its gloo group while the other was still
    printing the run's summary."""
    if _initialized():
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def device():
    """This process's device: its local GPU under torchrun on CUDA, the GPU in one process, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", world().local_rank)
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------------------------
# launching


def strip_nproc(argv: list[str]) -> list[str]:
    """The command line without `--nproc N` / `--nproc=N` (the launched processes must not launch again)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def relaunch(nproc: int, argv: list[str]) -> int:
    """Run `python -m ftcli ARGV` on `nproc` local processes through torchrun's own launcher (standalone
    rendezvous on a free port); returns the exit code of the first process that failed, or 0."""
    import logging
    import sys

    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # the agent's notices (OMP_NUM_THREADS, closing signals) and its failure summary: the failing rank printed the
    # message already
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed")]:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    args = torchrun.parse_args(["--standalone", f"--nproc-per-node={nproc}", "-m", "ftcli", *argv])
    try:
        torchrun.run(args)
    except SignalException:
        # Ctrl-C reaches the agent only (each process has a session of its own): it passes the signal on and waits
        # (30 s) for the processes to finish their step and checkpoint; they say so
        return 130
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode > 0:
            return failure.exitcode
        print(f"error: process {rank} of {nproc} ended by signal {failure.signal_name()}", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------------------------------
# collectives (no-ops in one process)


def shard(items: list) -> list:
    """This rank's share of `items`: items rank, rank + N, ... (sizes differ by at most one)."""
    w = world()
    return items if w.size == 1 else items[w.rank :: w.size]


def gather(local: list) -> list:
    """The inverse of `shard` on every rank: the per-rank lists interleaved back into the original order."""
    w = world()
    if w.size == 1:
        return local
    import torch.distributed as dist

    parts: list = [None] * w.size
    dist.all_gather_object(parts, local)
    out = []
    for i in range(max(len(p) for p in parts)):
        out.extend(p[i] for p in parts if i < len(p))
    return out


def gather_objects(obj) -> list:
    """`obj` of every rank, in rank order (on every rank)."""
    w = world()
    if w.size == 1:
        return [obj]
    import torch.distributed as dist

    parts: list = [None] * w.size
    dist.all_gather_object(parts, obj)
    return parts


def broadcast(obj):
    """Rank 0's `obj` on every rank."""
    if world().size == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(values: list[float]) -> list[float]:
    """Each number summed over the ranks (float64)."""
    if world().size == 1:
        return list(values)
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def all_gather_numbers(values: list[float]) -> list[list[float]]:
    """For each of `values`, its value on every rank (in rank order)."""
    if world().size == 1:
        return [[v] for v in values]
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    parts = [torch.empty_like(t) for _ in range(world().size)]
    dist.all_gather(parts, t)
    return torch.stack(parts, dim=1).tolist()


def any_rank(flag: bool) -> bool:
    return all_sum([float(flag)])[0] > 0


def first_failure() -> bool:
    """True in the first process of a launch to report a failure (and in a single process): it prints the message;
    processes that fail after it, usually because it left a collective, stay quiet. Counted in torchrun's key-value
    store, which does not depend on the process group still working."""
    if not launched():
        return True
    try:
        from datetime import timedelta

        import torch.distributed as dist

        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=timedelta(seconds=5))
        return store.add(f"{ERROR_KEY}/{os.environ.get('TORCHELASTIC_RUN_ID', '')}", 1) == 1
    except Exception:  # noqa: BLE001 - no store to agree in: say it rather than lose it
        return True
