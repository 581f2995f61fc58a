"""How many trials a worker runs at once on its device (``cbam-nas worker --slots N``).

Each slot is a worker process of its own (claiming, heart-beating and handing trials back as
any worker does); this module only decides how many there are by default and how the CPU's
cores are shared between them.

- CUDA: as many as the free memory holds at :data:`CUDA_SLOT_BYTES` each, at most
  :data:`MAX_CUDA_SLOTS`: small networks leave most of a card idle (a CIFAR ResNet-20 step is
  bound by kernel launches), and concurrent trials fill it.
- CPU: one per available core, at most :data:`MAX_CPU_SLOTS` (each slot holds its own torch
  and dataset, ~0.5-1 GiB), the cores shared evenly (torch threads per slot). On this
  repository's 2-core box 2 slots x 1 thread completed 1.07x the trials per hour of 1 slot x 2
  threads on the demo's search (``benchmarks/slots.py``, README, Performance).
"""

from __future__ import annotations

import os

CUDA_SLOT_BYTES = 3 * 1024**3
"""The device memory planned per slot: a CIFAR ResNet-20 or ResNet-18 trial at batch 128 with
CBAM everywhere, its data on the device and the allocator's slack, with room to spare."""
MAX_CUDA_SLOTS = 4
MAX_CPU_SLOTS = 8


def available_cores() -> int:
    """The cores this process may use: its CPU affinity (a container's or taskset's limit),
    and no more than ``OMP_NUM_THREADS`` when a parent set it for this process."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    limit = os.environ.get("OMP_NUM_THREADS", "")
    if limit.isdigit() and int(limit) > 0:
        cores = min(cores, int(limit))
    return max(1, cores)


def default_slots(device: str) -> int:
    """The slots a worker on ``device`` runs when ``--slots`` is not given."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return 1
        index = torch.device(device).index
        free, _total = torch.cuda.mem_get_info(0 if index is None else index)
        return max(1, min(MAX_CUDA_SLOTS, free // CUDA_SLOT_BYTES))
    return min(MAX_CPU_SLOTS, available_cores())


def threads_per_slot(device: str, slots: int) -> int | None:
    """torch threads for each slot: the cores shared evenly on CPU; None (torch's default)
    on a GPU, where the host threads only feed the device."""
    if device.startswith("cuda"):
        return None
    return max(1, available_cores() // slots)
