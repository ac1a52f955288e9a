"""Processes and seeds: the accelerator of a phase, the main process, the world size, sums over processes, and FSDP
sharding."""

from __future__ import annotations

import copy
import logging
import random

import numpy as np
import torch
from torch import Tensor
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed as accelerate_set_seed

from kdistill.config import TrainConfig
from kdistill.errors import UserError

log = logging.getLogger(__name__)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    accelerate_set_seed(seed)

def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """The run's Accelerator. Our step counts are global optimizer steps (every process takes each one), so the
    schedule steps once per step, not once per process as accelerate would by default."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if AcceleratorState._shared_state.get("_mixed_precision", cfg.mixed_precision) != cfg.mixed_precision:
        # accelerate keeps one precision per process and refuses another; one process may train with several
        # (a benchmark comparing them, a notebook): forget the old one (the processes' state, PartialState, stays)
        AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available(),
                              step_scheduler_with_optimizer=False)
    if accelerator.num_processes > 1 and accelerator.is_main_process:
        log.info("distributed run: world size %d (%s)", accelerator.num_processes, accelerator.distributed_type)
    return accelerator

def process_state() -> PartialState:
    """accelerate's view of the processes of this run. Without CUDA, torchrun and `accelerate launch` start CPU
    processes, which accelerate joins (gloo) only when told cpu=True at its first call: every call goes through here
    or make_accelerator, with the same flag."""
    return PartialState(cpu=not torch.cuda.is_available())

def is_main_process() -> bool:
    """True in the one process that writes files (the only process of a plain run)."""
    return process_state().is_main_process

def world_size() -> int:
    return process_state().num_processes

def sum_over_processes(values: dict[str, float], accelerator: Accelerator) -> dict[str, float]:
    keys = sorted(values)
    summed = accelerator.reduce(torch.tensor([values[k] for k in keys], dtype=torch.float64, device=accelerator.device),
                                reduction="sum")
    return {k: float(summed[keys.index(k)]) for k in values}

def average_gradients(module: torch.nn.Module, accelerator: Accelerator) -> None:
    """What DDP does for the model, for a module outside it: every process gets the mean of their gradients."""
    for p in module.parameters():
        if p.grad is not None:
            p.grad.copy_(accelerator.reduce(p.grad, reduction="mean"))

def shard_model(model: torch.nn.Module, accelerator: Accelerator) -> torch.nn.Module:
    """FSDP2: a copy of `model` sharded over the processes, each transformer block (the classes Hugging Face lists
    in `_no_split_modules`) and then the rest as one torch `fully_shard` unit: every process keeps 1/N of each
    parameter, and of its gradient and AdamW moments; a forward gathers a block's weights just before the block
    runs and frees them after. Gradients are reduce-scattered as means over the processes, as DDP all-reduces
    them, so the step normalisation (terms.step_loss) is unchanged.

    kdistill shards with torch itself: accelerate enables its FSDP plugin on GPUs only (on CPU it falls back to
    DDP), and the same calls then serve gloo (CPU) and NCCL (GPU). `model` itself stays whole, for evaluation and
    saving by the main process; its full copy is all the sharding does not save."""
    sharded = copy.deepcopy(model).to(accelerator.device)
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    if not blocks:
        raise UserError(f"train.fsdp: {type(model).__name__} names no transformer blocks (_no_split_modules) to "
                        "shard")
    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    for module in sharded.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    if accelerator.is_main_process:
        held = sum(p.to_local().numel() for p in sharded.parameters())
        log.info("train.fsdp: student sharded over %d processes: this one holds %d of its %d parameters",
                 accelerator.num_processes, held, sum(p.numel() for p in sharded.parameters()))
    return sharded

def full_state_dict(model: torch.nn.Module) -> dict[str, Tensor]:
    """`model`'s state dict with every sharded tensor (DTensor) gathered whole; every process must call it."""
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in model.state_dict().items()}
