"""Resumable training state of one phase (teacher, student, baseline), written atomically.

    RUN_DIR/checkpoints/<phase>/step-0000012/
      <learner>/               one folder per model that learns in the phase (student; teacher_after, ...)
        model.safetensors      its weights
        extra.safetensors      weights that learn along with it (the learned projections of hidden terms), if any
        best.safetensors       early stopping's best validation weights so far, if any
        optimizer.safetensors  the optimizer's tensors (AdamW moments and step counts)
      state.safetensors    each process's torch RNG state
      state.json           the rest: step, each data stream's position, each learner's optimizer param groups,
                           schedule, history and early stopping, each process's python and numpy RNG states,
                           training time so far, and the fingerprint of the config and data the run trains on
                           (rundir.run_fingerprint)
      COMPLETE             written last

A checkpoint is written into a hidden `.step-0000012.tmp` dir, every file fsynced, COMPLETE last, and then renamed to
`step-0000012`; only after that are older checkpoints removed. Loading takes the newest dir that has COMPLETE, so a
kill at any moment leaves the last good checkpoint loadable, and a half-written one is never read. Tensors go to
safetensors and everything else to JSON: loading unpickles nothing.

What makes a resumed run take the very steps of an uninterrupted one: every learner's weights, optimizer, schedule
and early-stopping state, every process's RNG states (dropout), and each data stream's position: the epoch (which
seeds the sampler's order) and the batches of it already done, which are skipped without being loaded
(training.GroupStream).
Only the main process writes; every process reads. `kdistill run --resume RUN_DIR` re-reads the run's config
(`resume_config`); the pipeline skips the phases whose model dir is saved and resumes the one it was in. A
checkpoint whose fingerprint is not the resuming run's (another config or other data) is refused, not loaded.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from kdistill.config import RunConfig, load_config
from kdistill.errors import ConfigError, UserError
from kdistill.io import atomic_dir
from kdistill.rundir import fingerprint_change
from kdistill.training import GroupStream, Learner

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
PREFIX = "step-"


class Checkpoints:
    """The checkpoints of one training phase, in `directory` (RUN_DIR/checkpoints/<phase>).

    every: also save every this many steps (None: at epoch ends only). resume: `restore` continues from the newest
    complete checkpoint there (otherwise a run starts afresh and replaces what an earlier run left). fingerprint:
    of the run's config and data, saved with each checkpoint; `restore` refuses one saved with another."""

    def __init__(self, directory: str | Path, *, every: int | None = None, resume: bool = False,
                 fingerprint: dict | None = None):
        self.directory, self.every, self.resume, self.fingerprint = Path(directory), every, resume, fingerprint

    def stage(self, name: str) -> "Checkpoints":
        """The checkpoints of a stage within this phase, in a subdirectory: `clear` removes them with the phase's."""
        return Checkpoints(self.directory / name, every=self.every, resume=self.resume, fingerprint=self.fingerprint)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        if not self.directory.is_dir():
            return None
        complete = sorted(d for d in self.directory.glob(f"{PREFIX}*") if (d / COMPLETE).is_file())
        return complete[-1] if complete else None

    def due(self, step: int, stream: GroupStream) -> bool:
        return bool(self.every and step % self.every == 0) or stream.at_epoch_end

    def save(self, step: int, learners: list[Learner], streams: dict[str, GroupStream], accelerator: Accelerator, *,
             wall_time_s: float) -> None:
        """Write the state after `step` (every process calls this; the main process writes)."""
        rng = [rng_state()] if accelerator.num_processes == 1 else gather_object([rng_state()])
        if accelerator.is_main_process:
            final = self.directory / f"{PREFIX}{step:07d}"
            try:
                self._write(final, step, learners, streams, rng, wall_time_s)
            except (OSError, SafetensorError) as e:  # disk full, quota, permissions
                reason = getattr(e, "strerror", None) or str(e)
                raise UserError(f"cannot write checkpoint {getattr(e, 'filename', None) or final}: {reason}") from None
        accelerator.wait_for_everyone()

    def _write(self, final: Path, step: int, learners: list[Learner], streams: dict[str, GroupStream],
               rng: list[dict], wall_time_s: float) -> None:
        with atomic_dir(final) as tmp:  # replaces a `final` left by an earlier run into the same dir
            self._write_files(tmp, step, learners, streams, rng, wall_time_s)
        fsync(self.directory)
        for old in self.directory.iterdir():  # older checkpoints, and temp dirs of killed writes
            if old != final and (old.name.startswith(PREFIX) or old.name.endswith(".tmp")):
                shutil.rmtree(old, ignore_errors=True)

    def _write_files(self, tmp: Path, step: int, learners: list[Learner], streams: dict[str, GroupStream],
                     rng: list[dict], wall_time_s: float) -> None:
        tensors = {}
        for rank, state in enumerate(rng):
            tensors[f"rng.{rank}.torch"] = state.pop("torch")
            for i, cuda in enumerate(state.pop("cuda")):
                tensors[f"rng.{rank}.cuda.{i}"] = cuda
        save_file(tensors, str(tmp / "state.safetensors"))
        state = {
            "step": step,
            "positions": {name: stream.position for name, stream in streams.items()},
            "world_size": len(rng),
            "learners": [self._write_learner(tmp / learner.history.name, learner) for learner in learners],
            "rng": rng,
            "wall_time_s": wall_time_s,
            "fingerprint": self.fingerprint,
        }
        (tmp / "state.json").write_text(json.dumps(state, default=jsonable), encoding="utf-8")
        for f in tmp.rglob("*"):
            fsync(f)
        (tmp / COMPLETE).write_text(f"{step}\n", encoding="utf-8")  # last: the files before it are on disk
        fsync(tmp / COMPLETE)
        fsync(tmp)

    @staticmethod
    def _write_learner(folder: Path, learner: Learner) -> dict:
        """One learner's weights and optimizer tensors into `folder`; returns the rest of its state (JSON)."""
        folder.mkdir()
        save_model(unwrap(learner.model), str(folder / "model.safetensors"))
        if has_weights(learner.extra):
            save_model(learner.extra, str(folder / "extra.safetensors"))
        if learner.stopper.best_state is not None:
            save_file({k: v.contiguous() for k, v in learner.stopper.best_state.items()},
                      str(folder / "best.safetensors"))
        optimizer, tensors = split_tensors(learner.optimizer.state_dict())
        save_file(tensors, str(folder / "optimizer.safetensors"))
        return {
            "name": learner.history.name,
            "optimizer": optimizer,
            "scheduler": learner.scheduler.state_dict(),
            "history": learner.history.to_dict(),
            "early_stopping": {"best": learner.stopper.best, "bad_evals": learner.stopper.bad_evals},
        }

    def restore(self, learners: list[Learner], streams: dict[str, GroupStream],
                accelerator: Accelerator) -> tuple[int, float]:
        """Load the newest complete checkpoint into the `learners`, the `streams` and the RNGs, when resuming.

        Returns (steps done, training seconds so far): (0, 0.0) when there is nothing to resume."""
        path = self.latest() if self.resume else None
        if path is None:
            return 0, 0.0
        try:
            state = json.loads((path / "state.json").read_text(encoding="utf-8"))
            saved = state.get("fingerprint")
            changed = fingerprint_change(saved, self.fingerprint)
            if changed:
                why = "it records no fingerprint of its config and data" if saved is None \
                    else f"it was written for other {changed} than this run's (fingerprint differs)"
                raise UserError(f"cannot resume from {path}: {why}; delete {self.directory} to train this phase "
                                "from scratch")
            names = [saved_learner["name"] for saved_learner in state["learners"]]
            if names != [learner.history.name for learner in learners] or set(state["positions"]) != set(streams):
                raise ValueError(f"it holds {names}, this phase trains {[x.history.name for x in learners]}")
            tensors = load_file(str(path / "state.safetensors"))
            for learner, saved_learner in zip(learners, state["learners"]):
                self._read_learner(path / learner.history.name, learner, saved_learner, accelerator, state["step"])
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise UserError(f"cannot resume from {path}: {e}; delete that dir to resume from scratch") from None
        for name, stream in streams.items():  # before the RNG states: an epoch under way opens here (GroupStream)
            stream.seek(state["positions"][name])
        saved_world, rank = state["world_size"], accelerator.process_index
        if saved_world != accelerator.num_processes:
            log.warning("%s was written by %d processes, resumed by %d: the data order is kept, the random "
                        "streams (dropout) are not", path, saved_world, accelerator.num_processes)
        set_rng_state(state["rng"][rank % saved_world], tensors, rank % saved_world)
        if accelerator.is_main_process:
            position = state["positions"]["train"]
            log.info("%s: resumed from %s (epoch %d, %d batches of it done)", learners[0].history.name, path,
                     position["epoch"], position["batches_done"])
        return state["step"], state["wall_time_s"]

    @staticmethod
    def _read_learner(folder: Path, learner: Learner, saved: dict, accelerator: Accelerator, step: int) -> None:
        load_model(unwrap(learner.model), str(folder / "model.safetensors"))
        if has_weights(learner.extra):
            load_model(learner.extra, str(folder / "extra.safetensors"))
        best = folder / "best.safetensors"
        learner.stopper.best_state = load_file(str(best)) if best.is_file() else None
        tensors = load_file(str(folder / "optimizer.safetensors"))
        learner.optimizer.load_state_dict(join_tensors(saved["optimizer"], tensors,
                                                       learner.optimizer.state_dict()["param_groups"]))
        learner.scheduler.load_state_dict(saved["scheduler"])
        learner.history.load_dict(saved["history"])
        learner.history.open_tensorboard(learner.history.log_dir, accelerator, purge_step=step + 1)
        best_score = saved["early_stopping"]["best"]
        learner.stopper.best = tuple(best_score) if best_score is not None else None
        learner.stopper.bad_evals = saved["early_stopping"]["bad_evals"]

    def clear(self) -> None:
        """Remove this phase's checkpoints (its model is saved: nothing is left to resume)."""
        shutil.rmtree(self.directory, ignore_errors=True)


def resume_config(run_dir: str | Path, recipe: str | None = None, overrides: list[str] | None = None,
                  out: str | Path | None = None) -> RunConfig:
    """`--resume RUN_DIR`: the config the run started with (RUN_DIR/config.yaml). A recipe (and --set) given as well
    must resolve to the same config."""
    run_dir = Path(run_dir)
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise UserError(f"--resume {run_dir}: no config.yaml there (not a kdistill run dir)")
    if out is not None and Path(out).resolve() != run_dir.resolve():
        raise UserError(f"--out {out}: a resumed run continues in its own dir ({run_dir}); drop --out")
    try:
        cfg = load_config(saved)
    except ConfigError as e:
        raise UserError(f"--resume {run_dir}: its config.yaml is not a kdistill config, so this is not a kdistill "
                        f"run dir ({e})") from None
    if recipe is not None or overrides:
        given = _flat(load_config(recipe, overrides).model_dump(mode="json"))
        ran = _flat(cfg.model_dump(mode="json"))
        changed = next((k for k in {**ran, **given} if ran.get(k) != given.get(k)), None)
        if changed:
            raise UserError(f"--resume {run_dir}: {changed} is {given.get(changed)!r} here but "
                            f"{ran.get(changed)!r} in {saved}; drop RECIPE/--set to continue the run as it started")
    return cfg


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)  # DDP


def has_weights(module: torch.nn.Module | None) -> bool:
    return module is not None and any(True for _ in module.parameters())


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------- state <-> files

def split_tensors(optimizer_state: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """An optimizer state_dict as (JSON-able dict, tensors): each tensor replaced by {"tensor": its key}."""
    tensors, state = {}, {}
    for param, entries in optimizer_state["state"].items():
        state[str(param)] = {}
        for key, value in entries.items():
            if torch.is_tensor(value):
                name = f"optimizer.{param}.{key}"
                tensors[name] = value.detach().cpu().contiguous()
                value = {"tensor": name}
            state[str(param)][key] = value
    return {"state": state, "param_groups": optimizer_state["param_groups"]}, tensors


def join_tensors(saved: dict, tensors: dict[str, torch.Tensor], current_groups: list[dict]) -> dict:
    """The inverse of `split_tensors`; tuples (AdamW's betas) come back as tuples, as the current groups hold them."""
    state = {int(param): {key: tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v
                          for key, v in entries.items()}
             for param, entries in saved["state"].items()}
    groups = [{k: tuple(v) if isinstance(current.get(k), tuple) else v for k, v in group.items()}
              for group, current in zip(saved["param_groups"], current_groups)]
    return {"state": state, "param_groups": groups}


def rng_state() -> dict:
    """This process's random states: python, numpy, torch (CPU and every CUDA device)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(saved: dict, tensors: dict[str, torch.Tensor], rank: int) -> None:
    version, internal, gauss = saved["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = saved["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors[f"rng.{rank}.torch"])
    if torch.cuda.is_available():
        prefix = f"rng.{rank}.cuda."
        devices = sorted(int(k.removeprefix(prefix)) for k in tensors if k.startswith(prefix))
        if devices:
            torch.cuda.set_rng_state_all([tensors[f"{prefix}{i}"] for i in devices])


def jsonable(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serialisable in a checkpoint: {type(o).__name__}")
