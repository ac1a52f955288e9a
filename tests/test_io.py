"""Atomic output (kdistill/io.py) gives the files and dirs a plain write gives: the process umask decides who may
read them, not the owner-only mode of a temp file, and a file it replaces keeps its mode."""

from __future__ import annotations

import os
import stat

import pytest
from transformers import BertForSequenceClassification

from kdistill.io import atomic_dir, atomic_write_json, atomic_write_text
from kdistill.models import save_model
from tests.conftest import tiny_bert_config


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(params=[0o022, 0o027, 0o002], ids=["umask022", "umask027", "umask002"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def test_files_and_dirs_get_the_modes_a_plain_write_gives_under_the_umask(tmp_path, umask):
    (tmp_path / "plain.txt").write_text("x")
    (tmp_path / "plain").mkdir()
    file_mode, dir_mode = mode(tmp_path / "plain.txt"), mode(tmp_path / "plain")
    assert (file_mode, dir_mode) == (0o666 & ~umask, 0o777 & ~umask)

    assert mode(atomic_write_text(tmp_path / "a.txt", "x")) == file_mode
    assert mode(atomic_write_json(tmp_path / "a.json", {"a": 1})) == file_mode
    for _ in range(2):  # new, then replacing the one before
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "inside.txt").write_text("x")
            atomic_write_text(tmp / "meta.json", "{}")
        assert mode(tmp_path / "out") == dir_mode
        assert mode(tmp_path / "out" / "inside.txt") == mode(tmp_path / "out" / "meta.json") == file_mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.txt", "out", "plain", "plain.txt"]


def test_a_replaced_file_keeps_its_mode(tmp_path, umask):
    path = tmp_path / "config.yaml"
    path.write_text("old")
    path.chmod(0o640)
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and mode(path) == 0o640


def test_a_saved_model_dir_gets_a_plain_writes_modes_though_safetensors_writes_owner_only(tmp_path, tiny_tokenizer,
                                                                                        umask):
    model = BertForSequenceClassification(tiny_bert_config(tiny_tokenizer))
    save_model(model, tiny_tokenizer, tmp_path / "ours", {"task": "classification"})
    assert mode(tmp_path / "ours") == 0o777 & ~umask
    assert {f.name: mode(f) for f in (tmp_path / "ours").iterdir()} == {
        f.name: 0o666 & ~umask for f in (tmp_path / "ours").iterdir()}
