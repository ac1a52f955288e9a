"""What every phase of every task's pipeline shares: the run dir, write errors, saved phases, checkpoints,
histories and the frame of metrics.json."""

from __future__ import annotations

import errno
import socket
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError

from kdistill.checkpoint import Checkpoints
from kdistill.config import RunConfig
from kdistill.data import DataBundle
from kdistill.errors import UserError
from kdistill.measure import machine_info
from kdistill.io import atomic_write_json
from kdistill.training import world_size


def default_run_dir(cfg: RunConfig) -> Path:
    return Path("runs") / cfg.name

def run_dir_of(cfg: RunConfig, out: str | Path | None) -> Path:
    return Path(out) if out else default_run_dir(cfg)

def training_data(data: DataBundle) -> dict:
    """What training reads (and a checkpoint depends on): the train and validation splits, for the fingerprint."""
    out = {split: data.splits[split].to_dict() for split in ("train", "validation")}
    return out | ({"unlabeled": data.unlabeled} if data.unlabeled else {})

WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}

@contextmanager
def writing(run_dir: Path):
    """Disk full, quota, read-only or permission errors on the run dir become one line naming the path."""
    hint = f"free space or fix permissions, then continue with --resume {run_dir}"
    try:
        yield
    except OSError as e:
        inside = e.filename is None or Path(e.filename).resolve().is_relative_to(run_dir.resolve())
        if e.errno not in WRITE_ERRORS or not inside:
            raise
        raise UserError(f"cannot write {e.filename or run_dir}: {e.strerror}; {hint}") from None
    except SafetensorError as e:  # save_pretrained's weights: the OS error comes inside the message
        if not str(e).startswith("Error while serializing"):
            raise
        raise UserError(f"cannot write model weights in {run_dir}: {e}; {hint}") from None

def is_saved(model_dir: Path) -> bool:
    """A phase is done once its model dir is saved (save_model writes it atomically)."""
    return (model_dir / "model.safetensors").is_file()

def phase_checkpoints(cfg: RunConfig, run_dir: Path, phase: str, resume: bool,
                      fingerprint: dict | None) -> Checkpoints:
    return Checkpoints(run_dir / "checkpoints" / phase, every=cfg.train.checkpoint_every, resume=resume,
                       fingerprint=fingerprint)

def save_history(run_dir: Path, history) -> None:
    atomic_write_json(run_dir / "logs" / f"history_{history.name}.json", history.to_dict())

def run_metrics(cfg: RunConfig, data: DataBundle, shapes: dict | None, results: dict, **units: str) -> dict:
    """metrics.json of a run: its models' numbers (`results`), what it ran on, and the units (`units`: more)."""
    return {
        "run": cfg.name,
        "task": cfg.task,
        "strategy": cfg.distill.strategy,
        "data": data.summary(),
        "student_shape": shapes,
        "models": results,
        "machine": {**machine_info(), "host": socket.gethostname(), "eval_threads": cfg.eval.num_threads
                    or torch.get_num_threads(), "world_size": world_size()},
        "units": {"latency_ms_batch1": "ms", "throughput_per_s": "examples/s", "size_mb": "MiB",
                  "train_wall_time_s": "s", **units},
    }
