"""The run directory: a run writes only into a dir that is its own, and never loses files it did not create.

A run's own dir is one it creates, an empty one, or (`--resume DIR`) the dir of the run it continues. A non-empty
dir is refused unless the user passes `--overwrite`, which removes the outputs a run writes (OUTPUTS) and keeps
every other file. When kdistill creates a run dir it writes `kdistill-run.json`: the fingerprint of the config
and the data the run started with, which `--resume` compares with what it is given. When a run fails with a
UserError before it saved anything it could resume from, what it created is removed again.

Claiming is atomic: the process that writes holds an exclusive lock on `.kdistill.lock` in the dir (flock) for the
run's life, and checks under it that the dir is still its own; of several runs started together into one dir,
one proceeds and the others are refused. The lock goes with the process, so a killed run leaves none.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kdistill.config import RunConfig, dump_config
from kdistill.errors import UserError
from kdistill.io import PROBE, WriteError, atomic_write_json, atomic_write_text, check_writable
from kdistill.training import is_main_process

MANIFEST = "kdistill-run.json"
PROGRESS = ("teacher", "student", "baseline", "teacher_after", "checkpoints")
"""What a run saves to resume from: finished phases' model dirs and checkpoints."""
OUTPUTS = ("config.yaml", MANIFEST, *PROGRESS, "logs", "metrics.json", "report.md", "plots", "export")
"""Everything a run writes into its dir (README "Run directory"): what --overwrite removes."""
LOCK = ".kdistill.lock"
"""Held by the process that claimed the dir while its run lasts (claim_run_dir); not an output."""
UNFINGERPRINTED = ("name", "eval", "export", "train.checkpoint_every", "train.num_threads")
"""Config keys that do not change what is trained, which a resumed run may see changed."""
FINGERPRINTED_WHEN_SET = ("student.from_scratch",)
"""Config keys newer than the runs one may resume: left out of the fingerprint while unset (None), which is what a
run started before they existed meant, so that such a run still resumes."""


def run_fingerprint(cfg: RunConfig, training_data) -> dict[str, str]:
    """sha256 of the config (less UNFINGERPRINTED, and FINGERPRINTED_WHEN_SET where unset) and of `training_data`
    (the texts and labels training reads: any JSON-able value)."""
    config = cfg.model_dump(mode="json")
    for key in UNFINGERPRINTED + FINGERPRINTED_WHEN_SET:
        *sections, last = key.split(".")
        node = config
        for section in sections:
            node = node[section]
        if key in UNFINGERPRINTED or node[last] is None:
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
    if not is_main_process():
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir}: exists and is not a directory; choose a dir for the run")
    try:  # a read-only dir fails now, not once the data is read
        check_writable(run_dir, inside=True)
    except WriteError as e:
        raise UserError(f"cannot write the run directory {run_dir}: {e.reason}") from None
    if resume or not run_dir.is_dir() or not any(p.name != LOCK and not p.name.startswith(PROBE)
                                                  for p in run_dir.iterdir()):
        return  # (another process's lock or probe is no content)
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
    """Claim `run_dir` (checked by check_run_dir) for the block: lock it, check again under the lock that it is
    this run's, create it with its config.yaml and manifest, or, resuming, check that config and data are the
    run's. On a UserError before the run saved anything to resume from, remove what this call created. Only the
    main process claims and writes."""
    if resume:
        check_resume(run_dir, cfg, fingerprint)
    if not is_main_process():
        yield run_dir
        return
    new = _first_missing(run_dir)
    with claim_run_dir(run_dir):
        if not resume:  # another run may have claimed the dir since check_run_dir, and finished
            check_run_dir(run_dir, {}, resume=False, overwrite=overwrite)
        if overwrite:
            _remove_outputs(run_dir)
        before = set(run_dir.iterdir()) if new is None else set()
        try:
            _create(run_dir, cfg, fingerprint, resume=resume)
            yield run_dir
        except UserError as e:
            if resume or any((run_dir / name).exists() for name in PROGRESS):
                raise
            _remove_created(run_dir, new, before)
            if isinstance(e, WriteError):  # its hint may say --resume: there is nothing left to resume
                raise e.with_hint("free space or fix the permissions, then start the run again (nothing it "
                                  f"wrote in {run_dir} was kept)") from None
            raise


@contextmanager
def claim_run_dir(run_dir: Path) -> Iterator[Path]:
    """Hold `run_dir`'s lock (LOCK, flock) for the block, creating the dir if it is missing; a UserError naming
    the dir when another process holds it. The lock file is removed on the way out."""
    lock = run_dir / LOCK
    while True:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except FileNotFoundError:  # the dir was removed in between (a run that failed cleans up): again
            continue
        except OSError as e:
            raise UserError(f"cannot write the run directory {run_dir}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip()
            os.close(fd)
            raise UserError(f"--out {run_dir}: another kdistill process{f' (pid {holder})' if holder else ''} is "
                            "using it; wait for it to end, or choose a new dir") from None
        if _is_file(fd, lock):
            break
        os.close(fd)  # the holder released and removed the file between open and flock: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        yield run_dir
    finally:
        if _is_file(fd, lock):  # (a failed run may have removed the dir, and another claimed it anew)
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()  # while still locked: a process waiting on this file then sees it gone
        os.close(fd)


def _is_file(fd: int, path: Path) -> bool:
    """Whether the open file `fd` is the one at `path`."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


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
