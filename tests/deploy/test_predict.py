"""Predictor: PyTorch and onnxruntime backends agree, truncation is reported, JSONL in/out, clear errors."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest

from kdistill.deploy.export import export_model
from kdistill.deploy.predict import load_predictor, predict_file, read_jsonl_texts
from kdistill.errors import UserError

LABELS = ["sport", "tech", "politics"]


@pytest.fixture(scope="module")
def onnx_dir(tiny_bert_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("predict") / "onnx"
    export_model(tiny_bert_dir, fmt="onnx", out_dir=out)
    return out


def test_backends_agree_on_toy_texts(tiny_bert_dir, onnx_dir, toy_examples):
    texts = [r["text"] for r in toy_examples[:30]]
    torch_pred = load_predictor(tiny_bert_dir)
    onnx_pred = load_predictor(onnx_dir)
    assert (torch_pred.backend, onnx_pred.backend) == ("torch", "onnx")
    a, b = torch_pred.predict(texts, batch_size=7), onnx_pred.predict(texts, batch_size=32)
    assert [r["label"] for r in a] == [r["label"] for r in b]
    for ra, rb in zip(a, b):
        assert ra["label_name"] == LABELS[ra["label"]]
        assert list(ra["probabilities"]) == LABELS
        assert sum(ra["probabilities"].values()) == pytest.approx(1.0)
        assert ra["probabilities"][ra["label_name"]] == max(ra["probabilities"].values())
        np.testing.assert_allclose(list(ra["probabilities"].values()), list(rb["probabilities"].values()), atol=1e-5)
    # the order of results follows the input, whatever the batching
    single = [torch_pred.predict([t])[0]["label"] for t in texts[:5]]
    assert single == [r["label"] for r in a[:5]]


def test_metadata(tiny_bert_dir, onnx_dir):
    meta = load_predictor(tiny_bert_dir).metadata
    assert meta["labels"] == LABELS and meta["backend"] == "torch" and meta["max_length"] == 32
    assert meta["num_parameters"] > 1000
    onnx_meta = load_predictor(onnx_dir).metadata
    assert onnx_meta["num_parameters"] == meta["num_parameters"]  # recorded in kdistill.json at export
    assert onnx_meta["backend"] == "onnx"


def test_max_length_from_kdistill_json(tiny_bert_dir, tmp_path):
    import shutil

    d = tmp_path / "m"
    shutil.copytree(tiny_bert_dir, d)
    (d / "kdistill.json").write_text(json.dumps({"task": "classification", "max_length": 8}))
    assert load_predictor(d).max_length == 8


def test_truncation_warning_counts_inputs(tiny_bert_dir, caplog):
    pred = load_predictor(tiny_bert_dir)
    long_text = " ".join(["goal match team"] * 40)  # far past max_length=32 tokens
    with caplog.at_level(logging.WARNING, logger="kdistill.deploy.predict"):
        out = pred.predict([long_text, "vote law", long_text], batch_size=2)
    assert len(out) == 3
    warnings = [r for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 1
    assert "2 of 3" in warnings[0].getMessage() and "max_length=32" in warnings[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kdistill.deploy.predict"):
        pred.predict(["vote law"])
    assert not [r for r in caplog.records if "truncated" in r.getMessage()]


def test_predict_file_roundtrip(tiny_bert_dir, toy_examples, tmp_path):
    src = tmp_path / "in.jsonl"
    rows = [{"id": i, "text": r["text"], "label": r["label"]} for i, r in enumerate(toy_examples[:6])]
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")  # blank line skipped
    out = tmp_path / "out.jsonl"
    records = predict_file(tiny_bert_dir, src, out)
    written = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert written == records and len(written) == 6
    expected = load_predictor(tiny_bert_dir).predict([r["text"] for r in rows])
    for row, rec, exp in zip(rows, written, expected):
        assert rec["id"] == row["id"] and rec["label"] == row["label"]  # input fields kept, gold label untouched
        assert rec["prediction"]["label"] == exp["label"]
    assert not list(tmp_path.glob(".out.jsonl.*"))  # no temp file left


def test_predict_file_bad_line_names_file_and_line(tiny_bert_dir, tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "goal"}\n{"text": "vote"}\n{"text": "oops"\n', encoding="utf-8")
    out = tmp_path / "out.jsonl"
    with pytest.raises(UserError, match=r"bad\.jsonl:3: invalid JSON"):
        predict_file(tiny_bert_dir, src, out)
    assert not out.exists()
    src.write_text('{"text": "goal"}\n{"txt": "vote"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad\.jsonl:2: field 'text' missing"):
        predict_file(tiny_bert_dir, src, out)


def test_an_input_that_is_a_folder_is_named_as_one(tiny_bert_dir, tmp_path):
    with pytest.raises(UserError, match=f"input {tmp_path} is a folder"):
        predict_file(tiny_bert_dir, tmp_path, None)


def test_load_errors_name_the_path(tmp_path, tiny_bert_dir):
    with pytest.raises(UserError, match=r"nope: not a model dir \(no such folder\)"):
        load_predictor(tmp_path / "nope")
    with pytest.raises(UserError, match="needs model.onnx"):
        load_predictor(tiny_bert_dir, backend="onnx")
    with pytest.raises(UserError, match="input file not found"):
        predict_file(tiny_bert_dir, tmp_path / "missing.jsonl", None)


def test_long_inputs_are_tokenized_from_a_prefix_with_the_same_result(tiny_bert_dir, monkeypatch):
    import kdistill.deploy.predict as predict_mod

    pred = load_predictor(tiny_bert_dir)  # max_length 32: texts past 256 characters are cut first
    words = "goal match team coach vote senate chip data robot phone network the".split()
    texts = [
        " ".join(words[i % len(words)] for i in range(200)),  # long: cut, still overflows
        "short text",
        " ".join(words[:3]) + "\n" + "x" * 400,  # one 400-char word past the cut: cut before it, overflows
        "senate " * 30 + "y" * 300,  # 31 tokens of the prefix fit: re-tokenized whole
        "机器人" * 200,  # no whitespace: never cut (one 600-character word: a single [UNK] here)
        "team\tcoach\r\nvote " * 40,
    ]
    calls = []
    tokenize = predict_mod.Predictor._tokenize
    monkeypatch.setattr(predict_mod.Predictor, "_tokenize", lambda self, t: calls.append(list(t)) or tokenize(self, t))
    got, got_truncated = pred.encode(texts)
    assert any(len(c) < len(t) for c, t in zip(calls[0], texts))  # some were cut
    monkeypatch.setattr(predict_mod, "PREFIX_CHARS_PER_TOKEN", 10**6)  # never cut: the reference
    want, want_truncated = pred.encode(texts)
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    assert got_truncated == want_truncated == 4


# ------------------------------------------------------------------------------------- bad deployment inputs


def _cli(argv, capsys) -> tuple[int, str]:
    """kdistill.cli.main in-process: (exit code, stderr)."""
    from kdistill.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    return exit_info.value.code, capsys.readouterr().err.strip()


def test_texts_with_unpaired_surrogates_are_refused_naming_them(tiny_bert_dir, tmp_path):
    pred = load_predictor(tiny_bert_dir)
    with pytest.raises(UserError, match=r"texts\[1\]: unpaired surrogate U\+D800 at character 4"):
        pred.predict(["goal", "vote\ud800"])
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "goal"}\n{"text": "bad \\udc80 text"}\n', encoding="utf-8")  # a JSON escape
    with pytest.raises(UserError, match=r"in\.jsonl:2: field 'text': unpaired surrogate U\+DC80"):
        predict_file(tiny_bert_dir, src, tmp_path / "out.jsonl")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


@pytest.mark.parametrize("verb", ["predict", "evaluate"])
def test_out_that_is_a_folder_is_exit_2_and_nothing_is_written(verb, tiny_bert_dir, toy_examples, tmp_path,
                                                               capsys):  # fmt: skip
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in toy_examples[:6]), encoding="utf-8")
    out = tmp_path / "results"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    data_args = ["--file", src] if verb == "predict" else ["--data", src, "--split", "all"]
    code, err = _cli([verb, tiny_bert_dir, *data_args, "--out", out], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert str(out) in err and "is a folder" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "results"]


@pytest.mark.parametrize("verb", ["predict", "evaluate"])
def test_an_existing_out_file_is_replaced_only_with_overwrite(verb, tiny_bert_dir, toy_examples, tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in toy_examples[:6]), encoding="utf-8")
    out = tmp_path / "mine.json"
    out.write_text("the user's own file")
    data_args = ["--file", src] if verb == "predict" else ["--data", src, "--split", "all"]
    code, err = _cli([verb, tiny_bert_dir, *data_args, "--out", out], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and f"output {out} exists" in err and "--overwrite" in err
    assert out.read_text() == "the user's own file"
    from kdistill.cli import main

    main([str(a) for a in (verb, tiny_bert_dir, *data_args, "--out", out, "--overwrite")])  # returns: exit 0
    assert out.read_text() != "the user's own file"


def test_an_empty_text_is_exit_2_as_on_the_server(tiny_bert_dir, capsys):
    code, err = _cli(["predict", tiny_bert_dir, "goal", "  "], capsys)
    assert code == 2 and err == "kdistill: texts[1] is empty"


def test_predict_texts_honour_out(tiny_bert_dir, tmp_path, capsys):
    out = tmp_path / "preds.jsonl"
    from kdistill.cli import main

    main(["predict", str(tiny_bert_dir), "goal match", "vote", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["text"] for r in rows] == ["goal match", "vote"] and all("label_name" in r for r in rows)


@pytest.fixture
def pickle_only_dir(tiny_bert_dir, tmp_path):
    """tiny_bert_dir with its weights as pytorch_model.bin only: a pickle that would make a folder if unpickled."""
    import pickle
    import shutil

    path = tmp_path / "pickled"
    shutil.copytree(tiny_bert_dir, path)
    (path / "model.safetensors").unlink()

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(tmp_path / "UNPICKLED"),))

    (path / "pytorch_model.bin").write_bytes(pickle.dumps({"weights": Payload()}))
    return path


def test_a_pickle_only_model_dir_is_refused_by_every_loader(pickle_only_dir, tmp_path, capsys):
    from kdistill.models import load_causal_lm, load_classifier, load_dir_model, load_model_dir

    refused = r"pickled[/\\]?: holds pytorch_model\.bin but no model\.safetensors.*never unpickles"
    for load in (lambda: load_predictor(pickle_only_dir), lambda: load_predictor(pickle_only_dir, backend="torch"),
                 lambda: load_dir_model(pickle_only_dir), lambda: load_model_dir(pickle_only_dir),
                 lambda: load_classifier(str(pickle_only_dir)), lambda: load_causal_lm(str(pickle_only_dir)),
                 lambda: export_model(pickle_only_dir, fmt="hf", out_dir=tmp_path / "exported")):  # fmt: skip
        with pytest.raises(UserError, match=refused):
            load()
    code, err = _cli(["predict", pickle_only_dir, "goal"], capsys)
    assert code == 2 and "never unpickles" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "UNPICKLED").exists() and not (tmp_path / "exported").exists()


def test_an_input_file_is_read_as_the_data_files_are_bom_dropped_bad_bytes_named(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "caf\xc3\xa9 \xe2\x80\xa8 x"}\n{"text": "b"}\n')
    assert read_jsonl_texts(path)[1] == ["caf\u00e9 \u2028 x", "b"]
    path.write_bytes(b'{"text": "a"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"in\.jsonl: line 2: not valid UTF-8"):
        read_jsonl_texts(path)
    for ending in (b"\r", b"\r\n"):  # old Mac and Windows line ends: two rows, and errors name the right line
        path.write_bytes(ending.join([b'{"text": "a"}', b'{"text": "b"}', b'', b'{"text": 3}']))
        with pytest.raises(UserError, match=r"in\.jsonl:4: field 'text' missing or not a string"):
            read_jsonl_texts(path)
        path.write_bytes(ending.join([b'{"text": "a"}', b'{"text": "b"}']) + ending)
        assert read_jsonl_texts(path)[1] == ["a", "b"]


def test_one_model_dir_reader_for_training_and_deployment(tiny_bert_dir, tmp_path, capsys):
    """models.inspect_model_dir reads config.json and kdistill.json for load_model_dir and load_predictor alike: the
    same labels and task, and the same one-line error naming a malformed file (exit 2 from the CLI)."""
    import shutil

    from kdistill.models import inspect_model_dir, load_model_dir, read_meta
    from kdistill.task import guess_task

    info = inspect_model_dir(tiny_bert_dir)
    assert (info.labels, info.task) == (LABELS, "classification")
    assert load_predictor(tiny_bert_dir).labels == info.labels
    assert guess_task({"architectures": ["GPT2LMHeadModel"]}) == guess_task({"architectures": ["LlamaForCausalLM"]})
    assert guess_task({"architectures": ["GPT2LMHeadModel"]}).name == "causal-lm"

    d = tmp_path / "m"
    shutil.copytree(tiny_bert_dir, d)
    (d / "kdistill.json").write_text('{"task": "classification",')
    for load in (lambda: inspect_model_dir(d), lambda: read_meta(d), lambda: load_model_dir(d),
                 lambda: load_predictor(d)):  # fmt: skip
        with pytest.raises(UserError, match=r"m[/\\]kdistill\.json: not valid JSON \(line 1"):
            load()
    code, err = _cli(["predict", d, "goal"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "kdistill.json: not valid JSON" in err, err

    (d / "kdistill.json").write_text("{}")
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "id2label": {"0": "sport", "2": "tech"}}))
    for load in (lambda: load_model_dir(d), lambda: load_predictor(d)):
        with pytest.raises(UserError, match=r"config\.json: id2label ids must be 0\.\.1"):
            load()
