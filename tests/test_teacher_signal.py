"""`distill.teacher_signal`: a causal-LM run reads a teacher signal built before (by another run, copied elsewhere,
through a file:// URL) instead of running the teacher, trains exactly what the run that built it trained, and
refuses a signal of another key or a setting that cannot use one, in one line naming the key."""

from __future__ import annotations

import json
import os
import shutil

import fsspec
import pytest
import torch

from kdistill.cache import MANIFEST, SignalError, cache_key, open_teacher_signal, write_teacher_signal
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


def test_a_remote_signal_is_verified_from_its_footers_and_each_shard_is_fetched_once(tmp_path, monkeypatch):
    """Through an fsspec URL: verify opens each shard for its footer; the first read fetches a shard once, hashing
    the same bytes it decodes; changed bytes are a one-line error naming the shard's URL."""
    n, length, k, vocab = 7, 4, 3, 40
    key = cache_key(teacher="t", data="d", block_size=length, k=k)
    top = torch.log_softmax(torch.randn(n, length, vocab, generator=torch.Generator().manual_seed(0)), -1).topk(k)
    write_teacher_signal(tmp_path / "s", key, (n, length), lambda a, b: (top.values[a:b], top.indices[a:b]),
                         shard_blocks=3, vocab=vocab)
    fs = fsspec.filesystem("memory")
    url = f"memory://kdistill-remote-{os.getpid()}/s"
    try:
        for f in sorted((tmp_path / "s").iterdir()):
            data = f.read_bytes()
            if f.name == "shard-00001.parquet":  # changed in transit, in the middle of its data pages
                footer = int.from_bytes(data[-8:-4], "little") + 8
                middle = (4 + len(data) - footer) // 2
                data = data[:middle] + bytes(b ^ 0x55 for b in data[middle:middle + 8]) + data[middle + 8:]
            fs.pipe(f"{url}/{f.name}", data)
        opened = []
        signal = open_teacher_signal(url, key)
        real_open = signal.fs.open
        monkeypatch.setattr(signal.fs, "open", lambda path, *a, **kw: opened.append(path) or real_open(path, *a, **kw))
        signal.verify(vocab)
        assert sorted(p.rsplit("/", 1)[-1] for p in opened) == [f"shard-0000{s}.parquet" for s in range(3)]
        opened.clear()
        lp, ix = signal.lookup([6, 0, 2, 1])  # shards 2 and 0, one fetch each
        assert torch.equal(ix, top.indices[[6, 0, 2, 1]]) and len(opened) == 2 and MANIFEST not in str(opened)
        with pytest.raises(SignalError, match=rf"^teacher signal {url}/shard-00001\.parquet: sha256 .* differs from "
                                              "the manifest's"):
            signal.lookup([4])
        assert len(opened) == 3
    finally:
        fs.rm(url.rsplit("/s", 1)[0], recursive=True)
