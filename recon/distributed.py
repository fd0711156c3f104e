"""Data-parallel training over several processes (torch.distributed): `avatar train --nproc
N` starts N ranks on this machine (torch's elastic launch); `torchrun --nnodes M
--nproc-per-node N -m avatar train ...` runs them across machines. NCCL joins ranks on
GPUs (one GPU per rank: cuda:LOCAL_RANK), gloo on CPUs.

Each rank holds a whole replica of the method and its optimizer: a talking head stays
well under a few million Gaussians (or one hash grid), so nothing is sharded. A step's
batch of B views (recon/datamanager.py) is shared out, rank r taking views r, r + W, ...;
each rank weighs its own views' mean loss by its share of B, so that once the gradients
are summed over the ranks (one all-reduce) every replica holds the gradient of the mean
loss over all B views, and takes the same optimizer step as one process with the whole
batch would. Statistics a method gathers from the views (the Gaussians' densification
gradients) are summed the same way, before anything is decided from them, so every rank
densifies and prunes the same points. The replicas start from rank 0's state, and are
compared (a digest of every tensor) after each structure change and before each
checkpoint; any difference (a computation that is not bit-for-bit repeatable, such as
OpenMP's atomic sums) is mended from rank 0 and logged. Rank 0 alone writes the avatar
folder: checkpoints, metrics and the progress bar.

Where sharding would start to matter: a replica's parameters and Adam moments (about
240 bytes per Gaussian) must fit one device; with tens of millions of Gaussians (rooms,
full bodies at 4K) Grendel-GS's scheme would split the Gaussians over ranks by space and
exchange the ones each view needs, instead of all-reducing whole gradients.
"""

from __future__ import annotations

import os
import signal
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from avatar.errors import AvatarError

from .checkpoint import tensors_digest


@dataclass(frozen=True)
class Ranks:
    """This process's place in the run: rank of world (a single process: 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def first(self) -> bool:
        """Rank 0: the one that writes the avatar folder."""
        return self.rank == 0

    def share(self, items: list) -> list:
        """This rank's share of a step's items: items r, r + W, r + 2W, ..."""
        return items[self.rank:: self.world]


def launched() -> bool:
    """Whether this process is one rank of several (started by `--nproc` or torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def join(device: torch.device) -> Ranks:
    """Join the run's process group (NCCL for a GPU, gloo for the CPU); a single
    process's Ranks when not launched as several."""
    if not launched():
        return Ranks()
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return current()


def current() -> Ranks:
    """This process's Ranks (0 of 1 outside a process group)."""
    if not dist.is_available() or not dist.is_initialized():
        return Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank())


def leave() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _collective(op, *args) -> None:
    """Run a torch.distributed collective; AvatarError when another rank has left the run
    (its own message says why), rather than the transport's error."""
    try:
        op(*args)
    except RuntimeError as exc:
        raise AvatarError(None, "another process of this run has stopped, so this one stops too",
                          "see the first error of the run") from exc


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """t summed over every rank, in place (t itself in a single process)."""
    if current().world > 1:
        _collective(dist.all_reduce, t)
    return t


def sum_gradients(params: list[torch.Tensor]) -> None:
    """Sum `params`' gradients over the ranks, in one all-reduce. A parameter without a
    gradient on some rank takes zeros there; one without a gradient on every rank keeps
    none (Adam then leaves it and its moments alone, as one process would)."""
    if current().world == 1 or not params:
        return
    device = params[0].device
    has = sum_over_ranks(torch.tensor([float(p.grad is not None) for p in params], device=device))
    live = [p for p, n in zip(params, has.tolist()) if n > 0]
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if not live:
        return
    flat = sum_over_ranks(torch.cat([p.grad.reshape(-1) for p in live]))
    offset = 0
    for p in live:
        p.grad.copy_(flat[offset: offset + p.numel()].view_as(p.grad))
        offset += p.numel()


def broadcast_bytes(data: bytes | None, device: torch.device) -> bytes:
    """Rank 0's `data` on every rank (others pass None)."""
    first = current().first
    size = torch.tensor([len(data) if first else 0], dtype=torch.int64, device=device)
    _collective(dist.broadcast, size, 0)
    buf = (torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device) if first
           else torch.empty(int(size), dtype=torch.uint8, device=device))
    _collective(dist.broadcast, buf, 0)
    return data if first else buf.cpu().numpy().tobytes()


def replicas_agree(tensors: dict[str, torch.Tensor], device: torch.device) -> bool:
    """Whether every rank's `tensors` are bit for bit rank 0's (True in a single process)."""
    ranks = current()
    if ranks.world == 1:
        return True
    mine = torch.tensor([int(tensors_digest(tensors)[:15], 16)], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(ranks.world)]
    _collective(dist.all_gather, every, mine)
    return all(bool((t == every[0]).all()) for t in every)


# -- the launcher ------------------------------------------------------------------------

def launch(nproc: int, argv: list[str], out: Path, cuda: bool) -> None:
    """Run `avatar <argv>` as `nproc` ranks on this machine and wait for them; AvatarError
    naming the rank that ended the run, why, and what is left of the avatar."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed").setLevel(logging.CRITICAL)  # its reports would repeat ours
    if not cuda and "OMP_NUM_THREADS" not in os.environ:  # the cores shared out, not each rank taking all
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=0.2,
                          start_method="spawn")
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "avatar", *argv)
    except ChildFailedError as exc:
        rank, failure = min(exc.failures.items(), key=lambda kv: kv[1].timestamp)
        raise AvatarError(out, *failure_report(rank, failure.pid, failure.exitcode, out)) from None
    except SignalException as exc:  # the launcher's own handlers turn Ctrl-C and kill into this
        if exc.sigval == signal.SIGINT:
            raise KeyboardInterrupt from None
        raise AvatarError(out, f"the run was stopped by {signal.Signals(exc.sigval).name}",
                          "continue with the same command and --resume") from None


def failure_report(rank: int, pid: int, exitcode: int, out: Path) -> tuple[str, str | None]:
    """(problem, remedy) when rank `rank` ended the run with `exitcode` (-N: signal N)."""
    from .avatar_dir import CHECKPOINT
    from .checkpoint import load_checkpoint

    if exitcode == 1:  # a named error, which the rank printed
        return f"rank {rank} stopped the run on the error above", None
    if exitcode < 0:
        try:
            cause = f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            cause = f"was killed by signal {-exitcode}"
    else:
        cause = f"failed with exit code {exitcode} (its message is above)"
    problem = f"rank {rank} (pid {pid}) {cause}, which ended the run"
    try:
        step = load_checkpoint(out / CHECKPOINT)[1]["step"]
    except AvatarError:
        return f"{problem}; no checkpoint had been written", "run the same command again"
    return (f"{problem}; the last checkpoint (step {step}) is intact",
            "continue with the same command and --resume (with any --nproc)")
