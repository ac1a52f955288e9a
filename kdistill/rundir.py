"""The run directory: a run writes only into a dir that is its own, and never loses files it did not create.

A run's own dir is one it creates, an empty one, or (`--resume DIR`) the dir of the run it continues. A non-empty
dir is refused unless the user passes `--overwrite`, which removes the outputs a run writes (OUTPUTS) and keeps
every other file. When kdistill creates a run dir it writes `kdistill-run.json`: the fingerprint of the config
and the data the run started with, which `--resume` compares with what it is given. When a run fails with a
UserError before it saved anything it could resume from, what it created is removed again.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kdistill.config import RunConfig, dump_config
from kdistill.errors import UserError
from kdistill.io import atomic_write_json, atomic_write_text
from kdistill.training import is_main_process

MANIFEST = "kdistill-run.json"
PROGRESS = ("teacher", "student", "baseline", "teacher_after", "checkpoints")
"""What a run saves to resume from: finished phases' model dirs and checkpoints."""
OUTPUTS = ("config.yaml", MANIFEST, *PROGRESS, "logs", "metrics.json", "report.md", "plots", "export")
"""Everything a run writes into its dir (README "Run directory"): what --overwrite removes."""
UNFINGERPRINTED = ("name", "eval", "export", "train.checkpoint_every", "train.num_threads")
"""Config keys that do not change what is trained, which a resumed run may see changed."""


def run_fingerprint(cfg: RunConfig, training_data) -> dict[str, str]:
    """sha256 of the config (less UNFINGERPRINTED) and of `training_data` (the texts and labels training reads:
    any JSON-able value)."""
    config = cfg.model_dump(mode="json")
    for key in UNFINGERPRINTED:
        *sections, last = key.split(".")
        node = config
        for section in sections:
            node = node[section]
        node.pop(last)
    return {"config": _sha256(config), "data": _sha256(training_data)}


def _sha256(value) -> str:
    # ensure_ascii: texts with unpaired surrogates hash too
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode("ascii")).hexdigest()


def fingerprint_change(saved: dict | None, now: dict | None) -> str | None:
    """'config' or 'data', whichever of the two fingerprints differs (None: they agree)."""
    return next((part for part in ("config", "data") if (saved or {}).get(part) != (now or {}).get(part)), None)


def data_key(cfg: RunConfig) -> str:
    """The recipe key that names the data, and its value, for messages."""
    return f"data.train_file {cfg.data.train_file}" if cfg.data.train_file else f"data.dataset {cfg.data.dataset}"


def check_run_dir(run_dir: Path, inputs: dict[str, str | None], *, resume: bool, overwrite: bool) -> None:
    """Refuse, before anything is written, a run dir that is not this run's (main process: the one that writes).

    inputs: recipe key -> a path the run reads, which --overwrite must not remove."""
    if resume and overwrite:
        raise UserError("--overwrite and --resume: --resume continues a run, --overwrite replaces one; give one")
    if resume or not is_main_process():
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir}: exists and is not a directory; choose a dir for the run")
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return
    if not overwrite:
        is_run = (run_dir / MANIFEST).is_file()
        what = ("holds a finished kdistill run" if (run_dir / "metrics.json").is_file() else "holds a kdistill run") \
            if is_run else "is not empty"
        resume_hint = f", continue it with --resume {run_dir}" if is_run else ""
        raise UserError(f"--out {run_dir}: {what}; choose a new dir{resume_hint}, or pass --overwrite to replace "
                        "the kdistill outputs there (other files are kept)")
    for key, path in inputs.items():
        if path is None or not Path(path).exists():
            continue
        for name in OUTPUTS:
            if Path(path).resolve().is_relative_to((run_dir / name).resolve()):
                raise UserError(f"{key}: {path} lies in {run_dir / name}, which --overwrite would remove; move it or "
                                "choose another --out")


def check_resume(run_dir: Path, cfg: RunConfig, now: dict) -> None:
    """--resume: the config and data are those the run started with (a dir from before manifests: not checked)."""
    manifest = run_dir / MANIFEST
    if not manifest.is_file():
        return
    changed = fingerprint_change(json.loads(manifest.read_text(encoding="utf-8")).get("fingerprint"), now)
    if changed == "config":
        raise UserError(f"--resume {run_dir}: config.yaml is not the config this run started with (its fingerprint "
                        f"in {MANIFEST} differs); restore it, or start a new run with another --out")
    if changed == "data":
        raise UserError(f"--resume {run_dir}: {data_key(cfg)} holds other training data than when the run started "
                        f"(fingerprint in {MANIFEST}); restore it, or start a new run with another --out")


@contextmanager
def run_dir_for(cfg: RunConfig, run_dir: Path, fingerprint: dict, *, resume: bool = False,
                overwrite: bool = False) -> Iterator[Path]:
    """Claim `run_dir` (checked by check_run_dir): create it with its config.yaml and manifest, or, resuming, check
    that config and data are the run's. On a UserError before the run saved anything to resume from, remove what
    this call created. Only the main process writes."""
    if resume:
        check_resume(run_dir, cfg, fingerprint)
    main = is_main_process()
    if main and overwrite:
        _remove_outputs(run_dir)
    new = _first_missing(run_dir)
    before = set(run_dir.iterdir()) if main and new is None else set()
    try:
        if main:
            _create(run_dir, cfg, fingerprint, resume=resume)
        yield run_dir
    except UserError:
        if main and not resume and not any((run_dir / name).exists() for name in PROGRESS):
            _remove_created(run_dir, new, before)
        raise


def _remove_outputs(run_dir: Path) -> None:
    """--overwrite: the user asked that an earlier run's outputs, its checkpoints above all, go."""
    try:
        for name in OUTPUTS:
            _remove(run_dir / name)
    except OSError as e:
        raise UserError(f"--overwrite: cannot remove {e.filename}: {e.strerror}") from None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _create(run_dir: Path, cfg: RunConfig, fingerprint: dict, *, resume: bool) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "logs").mkdir(exist_ok=True)
        if not resume:
            atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
            atomic_write_json(run_dir / MANIFEST, {"fingerprint": fingerprint})
    except OSError as e:
        raise UserError(f"cannot write the run directory {run_dir}: {e.strerror}") from None


def _first_missing(path: Path) -> Path | None:
    """The outermost dir of `path` (itself included) that does not exist yet: what mkdir(parents=True) creates."""
    missing = None
    for p in (path, *path.parents):
        if p.exists():
            break
        missing = p
    return missing


def _remove_created(run_dir: Path, new: Path | None, before: set[Path]) -> None:
    if new is None:  # the dir was there (empty, or only files other than OUTPUTS): remove what the run added
        for path in set(run_dir.iterdir()) - before:
            _remove(path)
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    for parent in run_dir.parents:  # the parents it made, as long as they are empty (another run may use them)
        if not parent.is_relative_to(new):
            break
        try:
            parent.rmdir()
        except OSError:
            break
