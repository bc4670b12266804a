"""Several processes over one manifest (torchrun): which device each takes, and the one gather at the end.

torchrun starts one process per GPU and sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE. Each process
takes cuda:LOCAL_RANK (`rank_device`, a pure function) and makes it the current CUDA device before anything is
loaded, scores the files whose index is its RANK modulo WORLD_SIZE, and at the end sends its file entries to rank 0,
which writes the index and the aggregate once.

The processes never compute together: the only collective is that final gather of small Python objects, so the
group uses gloo (CPU) whatever the scoring device, with a timeout long enough for shards that finish hours apart.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

GATHER_TIMEOUT = datetime.timedelta(days=7)  # how long rank 0 waits for the slowest shard at the final gather


@dataclass(frozen=True)
class Ranks:
    """Where this process stands among the processes torchrun started (1 of 1 without torchrun)."""

    rank: int = 0  # RANK: this process among all
    world: int = 1  # WORLD_SIZE: processes in all
    local_rank: int = 0  # LOCAL_RANK: this process among those of its machine
    local_world: int = 1  # LOCAL_WORLD_SIZE: processes on its machine

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Ranks:
        """From torchrun's variables (absent: a single process).

        Raises:
            ValueError: a variable that is not a whole number, or ranks outside their sizes.
        """
        env = os.environ if env is None else env
        try:
            world = int(env.get("WORLD_SIZE", "1"))
            ranks = cls(int(env.get("RANK", "0")), world, int(env.get("LOCAL_RANK", "0")),
                        int(env.get("LOCAL_WORLD_SIZE", str(world))))  # fmt: skip
        except ValueError as e:
            raise ValueError(f"torchrun's RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE must be numbers: {e}") from e
        if not (0 <= ranks.rank < ranks.world and 0 <= ranks.local_rank < ranks.local_world):
            raise ValueError(f"inconsistent torchrun ranks {ranks}")
        return ranks


def rank_device(device: str, local_rank: int, local_world: int, cuda_devices: int) -> str:
    """The device one process scores on.

    Args:
        device: what the user asked for ("cpu", "cuda", "cuda:1", ...).
        local_rank, local_world: the process's LOCAL_RANK and LOCAL_WORLD_SIZE (0 and 1 without torchrun).
        cuda_devices: GPUs this process sees (`torch.cuda.device_count()`).
    Returns:
        "cuda:LOCAL_RANK" for "cuda" with several processes on the machine; the device as given otherwise.
    Raises:
        ValueError: one sentence for a GPU that is not there, or one GPU named for several processes.
    """
    try:
        kind = torch.device(device).type
    except RuntimeError as e:
        raise ValueError(f"--device {device!r} is not a device: give cpu, cuda or cuda:N") from e
    if kind not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {device}: scoring runs on cpu, cuda or cuda:N (mps untested), not {kind}")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device} asks for Apple's GPU, but torch sees none")
    if not device.startswith("cuda"):
        return device
    if cuda_devices < 1:
        raise ValueError(f"--device {device} asks for a GPU, but torch sees none")
    if device != "cuda":
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        if local_world > 1:
            raise ValueError(f"--device {device} puts all {local_world} processes of this machine on one GPU; "
                             "give --device cuda, and each process takes cuda:LOCAL_RANK")  # fmt: skip
        if index >= cuda_devices:
            raise ValueError(f"--device {device}: torch sees {cuda_devices} GPU(s)")
        return device
    if local_world == 1:
        return "cuda"
    if local_rank >= cuda_devices:
        raise ValueError(f"LOCAL_RANK {local_rank} has no GPU of its own: torch sees {cuda_devices}; start at most "
                         f"{cuda_devices} processes per machine (torchrun --nproc_per_node)")  # fmt: skip
    return f"cuda:{local_rank}"


def setup(ranks: Ranks, device: str) -> str:
    """Picks this process's device (`rank_device`), makes it current on CUDA, and joins the process group when there
    are several processes. Returns the device."""
    chosen = rank_device(device, ranks.local_rank, ranks.local_world,
                         torch.cuda.device_count() if device.startswith("cuda") else 0)  # fmt: skip
    if chosen.startswith("cuda:"):
        torch.cuda.set_device(torch.device(chosen))  # before any allocation: nothing lands on cuda:0 by default
    if ranks.world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo", timeout=GATHER_TIMEOUT)
    return chosen


def gather(objects: list, ranks: Ranks) -> list[list] | None:
    """Every rank's `objects`, in rank order, on rank 0 (None on the others); the objects themselves with one
    process."""
    if ranks.world == 1:
        return [objects]
    import torch.distributed as dist

    gathered: list = [None] * ranks.world if ranks.rank == 0 else None
    dist.gather_object(objects, gathered, dst=0)
    return gathered


def teardown() -> None:
    """Leaves the process group, if this process joined one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
