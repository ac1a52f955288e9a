"""Atomic output: a reader never sees a half-written file or directory.

The temp file or dir is created as a plain write would create it (mode 0o666 or 0o777, less the process umask),
not with tempfile's owner-only 0o600 / 0o700, which would survive the rename: a run dir or model dir written here
is as readable as one written by `open` or `save_pretrained`.

An output that cannot be written is a user's problem, not a bug: every verb checks where its outputs go before it
works (`check_writable`: a probe file, and the free space where the size is known), and a disk that fills up or a
permission refused while writing (`output_errors`) is a `WriteError`, one line naming the output, exit code 2.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from safetensors import SafetensorError

from kdistill.errors import UserError

T = TypeVar("T")

WRITE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})
"""The errno of an output that cannot be written: disk full, quota, read-only, permission, file too large."""
WRITE_HINT = "free space, fix the permissions or choose another location"
PROBE = ".kdistill-probe."
"""The name prefix of check_writable's probe files (there for an instant)."""


class WriteError(UserError):
    """An output could not be written (one of WRITE_ERRORS): the path, the system's reason and what to do."""

    def __init__(self, path: str | Path, reason: str, hint: str = WRITE_HINT):
        self.path, self.reason = path, reason
        super().__init__(f"cannot write {path}: {reason}; {hint}")

    def with_hint(self, hint: str) -> WriteError:
        return WriteError(self.path, self.reason, hint)


def _existing_dir(path: Path, output: Path) -> Path:
    """The nearest of `path` and its parents that exists (what is missing gets created there); a folder."""
    found = next((p for p in (path, *path.parents) if p.exists()), Path(path.anchor or "."))
    if not found.is_dir():
        raise WriteError(output, os.strerror(errno.ENOTDIR))
    return found


def human_size(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    unit = "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            break
        n /= 1024
    return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"


def check_writable(path: str | Path, needed_bytes: int | None = None, *, inside: bool = False) -> None:
    """Refuse (WriteError, one line naming `path`) an output that cannot be written, before any work is done.

    path: an output file or dir written beside itself (atomic_file, atomic_dir: a temp in its parent, then a
    rename), or, inside=True, a dir whose files are written in it. A probe file is created and removed where the
    writes go (the nearest of those dirs that exists: the missing ones are created later). needed_bytes: what the
    output will take; refused too when that file system has less free space (shutil.disk_usage)."""
    path = Path(path)
    where = _existing_dir(path if inside else path.parent, path)
    probe = where / f"{PROBE}{secrets.token_hex(4)}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        probe.unlink()
    except OSError as e:
        if e.errno not in WRITE_ERRORS:
            raise
        raise WriteError(path, e.strerror or str(e)) from None
    if needed_bytes:
        free = shutil.disk_usage(where).free
        if free < needed_bytes:
            raise WriteError(path, f"it needs about {human_size(needed_bytes)}, {where} has {human_size(free)} free",
                             "free space or choose another location")


def _temp_name(filename: str | None) -> bool:
    """A temp file or dir of _create_beside (a name the user never gave)."""
    return bool(filename) and any(part.startswith(".") and part.endswith(".tmp") for part in Path(filename).parts)


@contextlib.contextmanager
def output_errors(path: str | Path, hint: str = WRITE_HINT, *,
                  only_inside: bool = False) -> Iterator[None]:
    """An OS error of WRITE_ERRORS (or safetensors' failure to write weights) raised inside becomes a WriteError
    naming the file it hit, or `path` where that is a temp file or unknown. only_inside: map only the errors on
    files under `path` (a dir); others, e.g. reading an input, pass on."""
    path = Path(path)
    try:
        yield
    except OSError as e:
        hit = e.filename if isinstance(e.filename, (str, os.PathLike)) else None
        if e.errno not in WRITE_ERRORS or (only_inside and hit is not None
                                            and not Path(hit).resolve().is_relative_to(path.resolve())):
            raise
        raise WriteError(path if hit is None or _temp_name(os.fspath(hit)) else hit, e.strerror or str(e),
                         hint) from None
    except SafetensorError as e:  # save_pretrained's weights: the OS error comes inside the message
        if not str(e).startswith("Error while serializing"):
            raise
        raise WriteError(path, str(e), hint) from None


def _create_beside(path: Path, create: Callable[[Path], T]) -> tuple[Path, T]:
    """A new hidden temp name beside `path`, made by `create` (which raises FileExistsError if it is taken)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return tmp, create(tmp)
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """Yield a binary file opened beside `path`; on success it is fsynced and renamed over `path` (whose mode it
    keeps), on error removed, so `path` is either absent, its old content, or the whole new content."""
    path = Path(path)
    tmp, fd = _create_beside(path, lambda t: os.open(t, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        with os.fdopen(fd, "wb") as f:
            with contextlib.suppress(FileNotFoundError):  # replacing a file keeps its mode, as a plain write does
                os.fchmod(f.fileno(), stat.S_IMODE(os.stat(path).st_mode))
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) through `atomic_file`."""
    with atomic_file(path) as f:
        f.write(text.encode("utf-8"))
    return Path(path)


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=_jsonable) + "\n")


def _jsonable(o: Any):
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _widen_to_plain_mode(tmp: Path) -> None:
    """Give every file under `tmp` at least the mode a plain write gives: safetensors (>= 0.7) saves weights
    through an owner-only temp file of its own, so model.safetensors would be 0o600 whatever the umask."""
    probe = tmp / f".mode.{secrets.token_hex(4)}"
    os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    plain = stat.S_IMODE(os.stat(probe).st_mode)
    probe.unlink()
    for f in tmp.rglob("*"):
        if f.is_file() and not f.is_symlink():
            os.chmod(f, stat.S_IMODE(os.stat(f).st_mode) | plain)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temp dir beside `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    tmp, _ = _create_beside(path, lambda t: t.mkdir(0o777))
    try:
        yield tmp
        _widen_to_plain_mode(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)  # the previous content stays in place rather than vanish
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
