"""torchrun helpers: one process per rank (gloo on CPUs, nccl on GPUs). Training shares θ's
gradients (DDP); generation, answers and evaluation deal their work out in rounds and rank 0 writes
the one file a single process would write."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

import data
from runtime import default_device

# The group rank0_first's waiting ranks wait in (gloo, on GPUs too: its waits sleep instead of
# spinning): rank 0 may fine-tune alone for many hours meanwhile, far beyond a collective's usual
# timeout. A rank that dies ends them all through torchrun, so the long timeout only lets a true hang last.
_WAIT_GROUP = None
WAIT_TIMEOUT = timedelta(days=7)


def init_distributed() -> tuple[int, int, str]:
    """(rank, world size, device) of this process. Under torchrun (WORLD_SIZE > 1) joins the
    process group: gloo on CPUs, nccl on GPUs with one GPU per rank (LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = default_device()
    cuda = device == "cuda"
    if world == 1:
        return 0, 1, device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    global _WAIT_GROUP
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
        _WAIT_GROUP = dist.new_group(backend="gloo", timeout=WAIT_TIMEOUT)
    return dist.get_rank(), dist.get_world_size(), f"cuda:{local}" if cuda else "cpu"


@contextmanager
def rank0_first(rank: int, world: int):
    """Rank 0 runs the block first (conversions and caches are written once), then the others read.
    A user mistake rank 0 meets there (ValueError) is handed to the others, so every rank ends with
    the same one line instead of waiting for rank 0 and dying with a transport error. The others
    wait however long rank 0 takes (WAIT_TIMEOUT), without using their cores."""
    if world > 1 and rank != 0:
        err = [None]
        dist.broadcast_object_list(err, src=0, group=_WAIT_GROUP)
        if err[0] is not None:
            raise ValueError(err[0])
    threads = torch.get_num_threads()
    if world > 1 and rank == 0:
        torch.set_num_threads(local_threads())     # the others are waiting: their cores are free
    try:
        yield
    except ValueError as e:
        if world > 1 and rank == 0:
            dist.broadcast_object_list([str(e)], src=0, group=_WAIT_GROUP)
        raise
    finally:
        torch.set_num_threads(threads)
    if world > 1 and rank == 0:
        dist.broadcast_object_list([None], src=0, group=_WAIT_GROUP)


def local_threads() -> int:
    """The CPU threads of all of this machine's ranks together (torchrun starts each with
    OMP_NUM_THREADS=1 unless told otherwise): what one rank may use while the others wait or are gone."""
    return min(os.cpu_count() or 1, torch.get_num_threads() * int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def append_in_rounds(path, jobs: list, make, rank: int, world: int, on_write=None):
    """Append the records of make(job) for every job to one JSONL, in job order (generation under
    torchrun). Round r gives job r * world + k to rank k; rank 0 gathers the round and appends it in
    order, so the file is the one a single process writes, and an interrupted run resumes from the
    whole rounds already there. on_write(count) is called on rank 0 after each append."""
    if world > 1:
        dist.barrier()          # every rank has read what the file held before rank 0 appends to it
    for r in range(0, len(jobs), world):
        parts = [make(jobs[r + rank]) if r + rank < len(jobs) else []]
        if world > 1:
            mine, parts = parts[0], [None] * world
            dist.all_gather_object(parts, mine)
        if rank == 0:
            records = [rec for part in parts for rec in part]
            data.write_jsonl(path, records, append=True)
            if on_write is not None:
                on_write(len(records))
    if world > 1:
        dist.barrier()          # no rank reads the file before it is complete


def deal(items: list, rank: int, world: int) -> list:
    """This rank's share of items: every world-th from the rank's own on, so long and short items
    (sorted ones too) spread evenly. gather() puts the shares back in order."""
    return items[rank::world]


def gather(part: list, rank: int, world: int) -> list:
    """The results of every rank's deal() share, back in item order, on every rank."""
    if world == 1:
        return part
    parts = [None] * world
    dist.all_gather_object(parts, part)
    out = [None] * sum(map(len, parts))
    for k, p in enumerate(parts):
        out[k::world] = p
    return out


def cpus_per_rank() -> int:
    """This machine's CPUs over its ranks: what one rank's pool of worker processes may use."""
    return max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


@contextmanager
def cli_errors():
    """The body of a CLI that may run under torchrun (train, generate, pipeline): a user mistake
    (ValueError: a bad file, option or checkpoint) ends the process with one line, not a traceback,
    and the process group is closed either way."""
    try:
        yield
    except ValueError as e:
        sys.exit(f"error: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def all_sum(world: int, *xs: float) -> list[float]:
    if world == 1:
        return list(xs)
    t = torch.tensor(xs, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()
