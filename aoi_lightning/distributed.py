"""Several processes with Lightning's DDP: unpadded shards, and the collectives that combine a fit.

Both models are fitted by statistics, not gradients: each rank extracts features from its shard of the good
images, then PaDiM's moments are summed over ranks (all-reduce) and PatchCore's patches are gathered on rank 0,
which runs the coreset once and broadcasts the memory bank. Evaluation records and pixel histograms are gathered
the same way, so every rank ends with the metrics and thresholds of the whole split.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import Dataset, DistributedSampler

log = logging.getLogger(__name__)

#: Strategy names that mean "DDP" on the command line; they run as `StatisticsDDPStrategy`.
DDP_NAMES = ("ddp", "ddp_find_unused_parameters_false", "ddp_find_unused_parameters_true")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


class ShardSampler(DistributedSampler):
    """A contiguous, unpadded shard per rank: rank r of R reads items [r n / R, (r + 1) n / R) in order.

    Lightning's default distributed sampler pads the ranks to equal length by repeating items, which would
    count those images twice in the statistics, the metrics and the predictions. Here no item is seen twice,
    and the ranks' shards concatenated in rank order are the dataset in its own order. (Being a
    `DistributedSampler`, Lightning leaves it in place.)
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        n = len(dataset)  # type: ignore[arg-type]
        self.start = n * rank // num_replicas
        self.stop = n * (rank + 1) // num_replicas
        self.num_samples = self.stop - self.start
        self.total_size = n

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start


class StatisticsDDPStrategy(DDPStrategy):
    """Lightning's DDP (process launch, process group, barriers, broadcasts) without the
    `DistributedDataParallel` wrapper: the models have no trainable parameters, so there are no gradients to
    all-reduce (the wrapper refuses such modules, and would broadcast the buffers at every step)."""

    strategy_name = "ddp_statistics"

    def configure_ddp(self) -> None:
        return None


def resolve_strategy(strategy, devices, num_nodes) -> object:
    """The trainer's `strategy` value with DDP mapped to `StatisticsDDPStrategy`.

    `ddp` (and `auto` with several devices or nodes) becomes the statistics strategy; spawn-style strategies
    are refused with a message (they pickle the model into each process).
    """
    several = num_nodes not in (None, 1) or _device_count(devices) > 1
    if isinstance(strategy, str):
        if strategy in DDP_NAMES or (strategy == "auto" and several):
            return StatisticsDDPStrategy()
        if strategy.startswith("ddp") or strategy in ("deepspeed", "fsdp"):
            raise ValueError(
                f"trainer.strategy: {strategy!r} is not supported for these models; use `ddp` "
                "(one process per device, launched by Lightning)"
            )
    return strategy


def _device_count(devices) -> int:
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str):
        if devices.strip() in ("auto", "-1"):
            return 2  # several when the machine has them; DDP with one process is still correct
        if "," in devices:
            return len([d for d in devices.split(",") if d.strip()])
        try:
            return int(devices)
        except ValueError:
            return 1
    if isinstance(devices, int):
        return devices if devices >= 0 else 2
    return 1


# -- collectives ------------------------------------------------------------------------------------------------
def all_gather_objects(obj) -> list:
    """Every rank's `obj`, in rank order (pickled; for small objects and CPU tensors)."""
    if not is_distributed():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_objects_to_zero(obj) -> list | None:
    """Every rank's `obj` on rank 0 (in rank order), None elsewhere; memory is needed on rank 0 only."""
    if not is_distributed():
        return [obj]
    out: list | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    if dist.get_backend() == "nccl":  # nccl has no gather of objects: gather everywhere
        every = all_gather_objects(obj)
        return every if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_object(obj, src: int = 0):
    """`obj` of rank `src` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def sum_int(value: int, device: torch.device | str = "cpu") -> int:
    """Sum of an integer over ranks."""
    if not is_distributed():
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=_collective_device(device))
    dist.all_reduce(t)
    return int(t.item())


def _collective_device(device: torch.device | str) -> torch.device:
    """nccl collectives need CUDA tensors, gloo CPU (or CUDA) ones."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device)


# -- combining a fit --------------------------------------------------------------------------------------------
def reduce_moments(moments, device: torch.device | str) -> None:
    """Sum PaDiM's streaming moments over ranks, in place on every rank.

    Each rank's moments are centred on its own shift (the mean of its first batch); they are first re-centred
    on rank 0's shift (an exact rank-one update per position), then summed. A rank that saw no image
    contributes zeros.
    """
    facts = all_gather_objects(None if moments.shift is None else tuple(moments.shift.shape))
    present = [r for r, f in enumerate(facts) if f is not None]
    if not present:
        return
    shape = facts[present[0]]
    dev = _collective_device(moments.shift.device if moments.shift is not None else device)
    if moments.shift is None:
        channels, positions = shape
        moments.shift = torch.zeros(channels, positions, dtype=torch.float64, device=dev)
        moments.sum = torch.zeros(channels, positions, dtype=torch.float64, device=dev)
        moments.outer = torch.zeros(positions, channels, channels, dtype=torch.float64, device=dev)
    shift = moments.shift.to(dev).clone()
    dist.broadcast(shift, src=present[0])
    moments.reshift_(shift.to(moments.shift.device))
    for name in ("sum", "outer"):
        t = getattr(moments, name)
        moved = t.to(dev)
        dist.all_reduce(moved)
        setattr(moments, name, moved.to(t.device) if moved.device != t.device else moved)
    moments.count = sum_int(moments.count, dev)


def gather_patches(model) -> None:
    """Put the training patches of every rank together on rank 0 (rank order = image order); the other ranks
    drop theirs."""
    part = model.take_training_patches()
    parts = gather_objects_to_zero(None if part is None else part.clone())
    if rank() == 0:
        pieces = [p for p in parts if p is not None and p.shape[0] > 0]
        model.put_training_patches(torch.cat(pieces) if pieces else None)


def finalize_distributed(model) -> None:
    """Finalize a fit whose images were spread over the ranks; every rank ends with the same fitted model.

    The model says how its fit combines (`fit_combination`): `sum` (PaDiM: the moments of `fit_accumulator()`
    are re-centred and summed over ranks, then every rank finalizes the same sums) or `gather` (PatchCore: the
    patches of `take_training_patches()` go to rank 0, which runs the coreset once and broadcasts the memory bank
    to the others' `set_memory_bank`).
    """
    kind = getattr(model, "fit_combination", None)
    device = model.fitted.device
    if kind == "sum":
        reduce_moments(model.fit_accumulator(), device)
        model.finalize()  # the same inputs on every rank: the same statistics, without a 2nd broadcast
    elif kind == "gather":
        gather_patches(model)
        error = None
        if rank() == 0:
            try:
                model.finalize()  # the coreset runs once
            except Exception as exc:  # reported on every rank instead of leaving the others waiting
                error = exc
        bank = broadcast_object(None if error else model.memory_bank.cpu(), src=0)
        error = broadcast_object(error, src=0)
        if error is not None:
            raise error
        if rank() != 0:
            model.set_memory_bank(bank)
    else:
        raise TypeError(f"{type(model).__name__} has no distributed fit")
    log.info("fit combined over %d processes", world_size())
