"""What the teacher's config.json and the file system can tell is checked before any training and before the run
dir exists: layer indices and pairs, the position limit, student widths, relation heads, outputs that would
collide. One line naming the key, exit code 2."""

from __future__ import annotations

import re

import pytest

from kdistill.config import load_config
from kdistill.errors import UserError
from tests.helpers import given_teacher_recipe


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_tokenizer):
    return given_teacher_recipe(tmp_path_factory.mktemp("preflight"), tiny_tokenizer, {"kd": 1.0, "hidden_mse": 1.0})


@pytest.fixture
def no_training(monkeypatch):
    """Any training or data loading fails the test: the checks must come first."""
    import kdistill.pipeline.encoder as pipeline

    def trained(*args, **kwargs):
        raise AssertionError("trained before the checks")

    for name in ("train_teacher", "finetune", "distill_student"):
        monkeypatch.setattr(pipeline, name, trained)


def refused(cfg, out, **kwargs) -> str:
    from kdistill.pipeline import run

    with pytest.raises(UserError) as error:
        run(cfg, out, **kwargs)
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("overrides, message", [
    (["student.layers=[0, 4]"], r"^student\.layers: index 4 is out of range for a teacher with 4 layers"),
    (["student.layers=5"], r"^student\.layers: .*teacher's 4 layers"),
    (["distill.layer_mapping=[[0, 1], [1, 9]]"], r"^distill\.layer_mapping: teacher layer 9 out of range 0\.\.3"),
    (["distill.layer_mapping=[[2, 1]]"], r"^distill\.layer_mapping: student layer 2 out of range 0\.\.1"),
    (["data.max_length=100"], r"^data\.max_length: 100 exceeds the teacher's 64 positions"),
    (["student.hidden_size=64"], r"^student\.hidden_size=64 is larger than the teacher's 32"),
    (["distill.losses={kd: 1.0, minilm_qq: 1.0}", "distill.relation_heads=3"], r"^distill\.relation_heads: 3"),
])
def test_shape_errors_are_found_before_training_and_the_run_dir(recipe, tmp_path, no_training, overrides, message):
    out = tmp_path / "run"
    assert re.match(message, refused(load_config(recipe, overrides), out))
    assert not out.exists()


def test_a_from_scratch_teacher_is_checked_from_its_recipe(recipe, tmp_path, no_training, tiny_tokenizer):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(tiny_tokenizer.convert_ids_to_tokens(range(len(tiny_tokenizer)))), encoding="utf-8")
    scratch = f"{{tokenizer: {vocab}, hidden_size: 32, num_hidden_layers: 3, num_attention_heads: 4}}"
    cfg = load_config(recipe, ["teacher.path=null", f"teacher.from_scratch={scratch}", "student.layers=[1, 3]"])
    assert refused(cfg, tmp_path / "run").startswith("student.layers: index 3 is out of range for a teacher with 3")


def test_a_built_in_teacher_is_checked_from_its_config_json(recipe, tmp_path, no_training):
    cfg = load_config(recipe, ["teacher.path=null", "teacher.model=minilm-l6", "data.max_length=600"])
    assert refused(cfg, tmp_path / "run").startswith("data.max_length: 600 exceeds the teacher's 512 positions")
    cfg = load_config(recipe, ["teacher.path=null", "teacher.model=minilm-l6", "distill.layer_mapping=[[0, 6]]"])
    assert refused(cfg, tmp_path / "run").startswith("distill.layer_mapping: teacher layer 6 out of range 0..5")


def test_an_existing_export_dir_is_refused_before_training(recipe, tmp_path, no_training):
    out = tmp_path / "run"
    (out / "export" / "hf").mkdir(parents=True)
    (out / "export" / "hf" / "model.safetensors").write_bytes(b"")
    message = refused(load_config(recipe, ["export.formats=[hf]"]), out)
    assert message.startswith(f"--out {out}: ") and "--overwrite" in message
    assert [p.name for p in out.iterdir()] == ["export"]


def test_a_run_dir_that_is_a_file_is_refused_before_training(recipe, tmp_path, no_training):
    out = tmp_path / "run"
    out.write_text("mine")
    assert refused(load_config(recipe), out).startswith(f"--out {out}: ")
    assert out.read_text() == "mine"


@pytest.mark.parametrize("key", ["teacher.path", "teacher.model"])
def test_a_pickle_only_teacher_is_refused_before_the_data_is_read(recipe, tmp_path, no_training, key):
    import shutil

    cfg = load_config(recipe)
    pickled = tmp_path / "pickled"
    shutil.copytree(cfg.teacher.path, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")  # the name is what loaders fall back on
    overrides = [f"teacher.path={pickled}"] if key == "teacher.path" else ["teacher.path=null", f"teacher.model={pickled}"]
    message = refused(load_config(recipe, overrides), tmp_path / "run")
    assert message.startswith(f"{key}: {pickled}: holds pytorch_model.bin but no model.safetensors")
    assert not (tmp_path / "run").exists()
