"""What every phase of every task's pipeline shares: the run dir, write errors, saved phases, checkpoints,
histories and the frame of metrics.json."""

from __future__ import annotations

import logging
import socket
from dataclasses import replace
from pathlib import Path

import torch

from kdistill.checkpoint import Checkpoints
from kdistill.config import RunConfig
from kdistill.data import DataBundle
from kdistill.measure import machine_info
from kdistill.io import atomic_write_json, output_errors
from kdistill.models import load_model_dir, save_model
from kdistill.strategies.causal import distill_causal
from kdistill.strategies.phase import Phase
from kdistill.training import world_size

log = logging.getLogger(__name__)


def default_run_dir(cfg: RunConfig) -> Path:
    return Path("runs") / cfg.name

def run_dir_of(cfg: RunConfig, out: str | Path | None) -> Path:
    return Path(out) if out else default_run_dir(cfg)

def training_data(data: DataBundle) -> dict:
    """What training reads (and a checkpoint depends on): the train and validation splits, for the fingerprint."""
    out = {split: data.splits[split].to_dict() for split in ("train", "validation")}
    return out | ({"unlabeled": data.unlabeled} if data.unlabeled else {})

def writing(run_dir: Path):
    """Disk full, quota, read-only or permission errors on the run dir become one line naming the path
    (kdistill.io.WriteError); run_dir_for changes its hint when it removes the dir."""
    return output_errors(run_dir, f"free space or fix permissions, then continue with --resume {run_dir}",
                         only_inside=True)

def is_saved(model_dir: Path) -> bool:
    """A phase is done once its model dir is saved (save_model writes it atomically)."""
    return (model_dir / "model.safetensors").is_file()

def saved_phase(cfg: RunConfig, run_dir: Path, name: str, resume: bool):
    """The model phase `name` of a resumed run saved before the kill (its dir is whole), else None: train it."""
    if not (resume and is_saved(run_dir / name)):
        return None
    log.info("%s: trained before the run was resumed (%s)", name, run_dir / name)
    return load_model_dir(run_dir / name, task=cfg.task)[0]


def phase_checkpoints(cfg: RunConfig, run_dir: Path, phase: str, resume: bool,
                      fingerprint: dict | None) -> Checkpoints:
    return Checkpoints(run_dir / "checkpoints" / phase, every=cfg.train.checkpoint_every, resume=resume,
                       fingerprint=fingerprint)

def train_lm_phase(cfg: RunConfig, run_dir: Path, phase: Phase, *, resume: bool, fingerprint: dict, meta: dict,
                   main: bool = True, **distill_kwargs):
    """One phase of an LM run (the student, the no-KD baseline), trained from `phase` and saved with its history, or
    read back when a resumed run saved it before the kill: (the model, its history or None). Only the main process
    writes; `distill_kwargs` go to strategies.causal.distill_causal (pad_id, eos_id, cache)."""
    saved = saved_phase(cfg, run_dir, phase.name, resume)
    if saved is not None:
        return saved, None
    checkpoints = phase_checkpoints(cfg, run_dir, phase.name, resume, fingerprint)
    history = distill_causal(replace(phase, log_dir=run_dir / "logs", checkpoints=checkpoints), **distill_kwargs)
    if main:
        save_history(run_dir, history)
        save_model(phase.student, phase.tokenizer, run_dir / phase.name,
                   {**meta, "train_wall_time_s": history.wall_time_s, "training": history.budget()})
        checkpoints.clear()
    return phase.student, history


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
