"""`distill.teacher_signal`: a causal-LM run reads a teacher signal built before (by another run, copied elsewhere,
through a file:// URL) instead of running the teacher, trains exactly what the run that built it trained, and
refuses a signal of another key or a setting that cannot use one, in one line naming the key."""

from __future__ import annotations

import json
import shutil

import pytest

from kdistill.cli import main
from kdistill.config import load_config
from kdistill.errors import ConfigError
from tests.conftest import tiny_gpt2
from tests.helpers import assert_same_steps, history, write_lm_recipe


@pytest.mark.parametrize(("overrides", "message"), [
    (["distill.teacher_signal=/x", "distill.cache_teacher='off'"],
     "distill: teacher_signal is read as the teacher cache, but cache_teacher is off"),
    (["distill.teacher_signal=/x", "task=classification", "distill.losses={kd: 1.0}"],
     "distill.teacher_signal: task causal-lm only"),
    (["distill.teacher_signal=''"], "distill.teacher_signal:"),
])
def test_settings_that_cannot_use_a_signal_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config("lm", overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_run_reads_a_signal_built_elsewhere_and_refuses_one_of_another_key(tmp_path, monkeypatch, bpe_tokenizer,
                                                                            docs, capsys):
    recipe = write_lm_recipe(
        tmp_path, tiny_gpt2(bpe_tokenizer), bpe_tokenizer, docs, name="tiny-lm", block_size=32,
        student={"layers": 2},
        distill={"temperature": 2.0, "losses": {"forward_kl": 1.0, "lm": 0.5}, "cache_top_k": 16,
                 "baseline": False},
        train={"max_steps": 3, "batch_size": 4, "lr": 1.0e-3},
        eval={"repeats": 1, "warmup": 0, "throughput_batch_size": 2},
    )
    monkeypatch.setenv("KDISTILL_CACHE_DIR", str(tmp_path / "cache-a"))
    main(["run", str(recipe), "--out", str(tmp_path / "built")])
    built = json.loads((tmp_path / "built" / "metrics.json").read_text())["teacher_cache"]
    assert built["status"] == "built"
    shared = tmp_path / "shared" / "signal"
    shutil.copytree(built["path"], shared)  # as if fetched from another machine

    monkeypatch.setenv("KDISTILL_CACHE_DIR", str(tmp_path / "cache-b"))  # nothing cached on this "machine"
    main(["run", str(recipe), "--out", str(tmp_path / "read"), "--set", f"distill.teacher_signal={shared.as_uri()}"])
    read = json.loads((tmp_path / "read" / "metrics.json").read_text())["teacher_cache"]
    assert read["status"] == "prebuilt" and read["path"] == shared.as_uri() and read["key"] == built["key"]
    assert not (tmp_path / "cache-b" / "teacher-topk").exists()  # the teacher did not score the training set
    assert_same_steps(history(tmp_path / "read", "student")["steps"], history(tmp_path / "built", "student")["steps"],
                      rel=1e-6)  # the same signal, the same seed: the same training

    with pytest.raises(SystemExit) as exc:  # a signal of K = 16 for a run asking K = 8
        main(["run", str(recipe), "--out", str(tmp_path / "other-k"), "--set", f"distill.teacher_signal={shared}",
              "--set", "distill.cache_top_k=8"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exc.value.code == 2
    assert f"distill.teacher_signal: {shared} was built for another teacher, data or k (k 16, this run 8)" in err
    with pytest.raises(SystemExit) as exc:
        main(["run", str(recipe), "--out", str(tmp_path / "missing"),
              "--set", f"distill.teacher_signal={tmp_path / 'nowhere'}"])
    assert exc.value.code == 2
    assert "is not a complete teacher signal" in capsys.readouterr().err
