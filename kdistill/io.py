"""Atomic output: a reader never sees a half-written file or directory.

The temp file or dir is created as a plain write would create it (mode 0o666 or 0o777, less the process umask),
not with tempfile's owner-only 0o600 / 0o700, which would survive the rename: a run dir or model dir written here
is as readable as one written by `open` or `save_pretrained`.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

T = TypeVar("T")


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
