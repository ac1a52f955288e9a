"""Exports: HF copy reloads identically, ONNX matches PyTorch on any batch/sequence shape, int8 runs, atomicity."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from kdistill.deploy.export import export_model
from kdistill.errors import UserError

LABELS = ["sport", "tech", "politics"]


@pytest.fixture(scope="module")
def onnx_int8_dir(tiny_bert_dir, toy_examples, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "onnx"
    texts = [r["text"] for r in toy_examples]
    labels = [LABELS.index(r["label"]) for r in toy_examples]
    parity = export_model(tiny_bert_dir, fmt="onnx", out_dir=out, quantize="int8", parity_texts=texts,
                          parity_labels=labels)  # fmt: skip
    return out, parity


def _torch_logits(model_dir, enc):
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, use_safetensors=True).eval()
    with torch.no_grad():
        return model(**enc).logits.numpy()


def test_hf_export_reloads_with_identical_logits(tiny_bert_dir, toy_examples, tmp_path):
    out = tmp_path / "hf"
    parity = export_model(tiny_bert_dir, fmt="hf", out_dir=out)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "kdistill.json", "parity.json", "tokenizer.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
    assert parity["backends"]["hf"]["max_abs_logit_diff"] == 0.0
    assert json.loads((out / "kdistill.json").read_text())["max_length"] == 32
    tok = AutoTokenizer.from_pretrained(out)
    enc = tok([r["text"] for r in toy_examples[:10]], padding=True, return_tensors="pt")
    np.testing.assert_array_equal(_torch_logits(tiny_bert_dir, enc), _torch_logits(out, enc))
    assert not list(tmp_path.glob(".hf.tmp-*"))


def test_onnx_matches_pytorch_on_toy_texts(onnx_int8_dir, tiny_bert_dir, toy_examples):
    out, parity = onnx_int8_dir
    assert {"model.onnx", "model.int8.onnx", "config.json", "tokenizer.json", "kdistill.json", "parity.json"} <= {
        p.name for p in out.iterdir()
    }
    fp32 = parity["backends"]["onnx"]
    assert fp32["max_abs_logit_diff"] < 1e-4 and fp32["argmax_agreement"] == 1.0
    assert fp32["accuracy"] == parity["backends"]["pytorch"]["accuracy"]
    assert parity["n_texts"] == len(toy_examples)
    assert json.loads((out / "parity.json").read_text()) == {k: v for k, v in parity.items() if k != "out_dir"}


@pytest.mark.parametrize("texts", [["goal"], ["goal match team coach", "vote", "chip data robot phone network"],
                                   ["the " * 25 + "senate"] * 5])  # fmt: skip
def test_onnx_dynamic_batch_and_sequence(onnx_int8_dir, tiny_bert_dir, texts):
    out, _ = onnx_int8_dir
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    enc = tok(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    onnx_logits = session.run(["logits"], {k: v.numpy() for k, v in enc.items()})[0]
    ref = _torch_logits(tiny_bert_dir, enc)
    assert onnx_logits.shape == ref.shape == (len(texts), 3)
    assert np.abs(onnx_logits - ref).max() < 1e-4
    assert (onnx_logits.argmax(1) == ref.argmax(1)).all()


def test_int8_export_records_both_accuracies(onnx_int8_dir):
    out, parity = onnx_int8_dir
    int8 = parity["backends"]["onnx-int8"]
    assert int8["file"] == "model.int8.onnx"
    assert 0.0 <= int8["accuracy"] <= 1.0 and 0.0 <= parity["backends"]["onnx"]["accuracy"] <= 1.0
    assert 0.0 < int8["max_abs_logit_diff"] < 0.5  # quantized: close, but not bit-identical
    assert int8["argmax_agreement"] >= 0.8
    session = ort.InferenceSession(str(out / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    assert any(n.op_type in ("MatMulInteger", "DynamicQuantizeLinear") for n in _graph_nodes(out / "model.int8.onnx"))
    assert session.get_outputs()[0].name == "logits"


def test_fusion_is_recorded_and_optional(onnx_int8_dir, tiny_bert_dir, toy_examples, tmp_path):
    out, _ = onnx_int8_dir
    fused_ops = json.loads((out / "kdistill.json").read_text())["export"]["fused_ops"]
    assert fused_ops["Attention"] == 4 and fused_ops["SkipLayerNormalization"] >= 4  # one Attention per layer
    assert {n.op_type for n in _graph_nodes(out / "model.onnx")} >= {"Attention", "SkipLayerNormalization"}
    assert any(n.op_type == "QAttention" for n in _graph_nodes(out / "model.int8.onnx"))

    plain = tmp_path / "plain"
    parity = export_model(tiny_bert_dir, fmt="onnx", out_dir=plain, fuse=False,
                          parity_texts=[r["text"] for r in toy_examples])  # fmt: skip
    assert "fused_ops" not in json.loads((plain / "kdistill.json").read_text())["export"]
    assert not {"Attention", "SkipLayerNormalization"} & {n.op_type for n in _graph_nodes(plain / "model.onnx")}
    assert parity["backends"]["onnx"]["max_abs_logit_diff"] < 1e-4


def _graph_nodes(path):
    import onnx

    return onnx.load(str(path)).graph.node


def test_failure_leaves_no_out_dir(tmp_path, tiny_bert_dir):
    out = tmp_path / "out"
    with pytest.raises(UserError, match=r"missing: not a model dir \(no such folder\)"):
        export_model(tmp_path / "missing", fmt="onnx", out_dir=out)
    assert not out.exists()
    with pytest.raises(UserError, match="parity_labels has 1 labels for 2"):
        export_model(tiny_bert_dir, fmt="onnx", out_dir=out, parity_texts=["a", "b"], parity_labels=[0])
    with pytest.raises(UserError, match="needs fmt='onnx'"):
        export_model(tiny_bert_dir, fmt="hf", out_dir=out, quantize="int8")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temp dirs either


def test_failure_mid_export_cleans_up_and_keeps_old_out_dir(tmp_path, tiny_bert_dir, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old export")
    with pytest.raises(UserError, match="not empty; remove it or choose another --out"):  # the CLI has no overwrite
        export_model(tiny_bert_dir, fmt="hf", out_dir=out)

    import kdistill.deploy.export as export_mod

    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash while quantizing")

    monkeypatch.setattr(export_mod, "_quantize_int8", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        export_model(tiny_bert_dir, fmt="onnx", out_dir=out, quantize="int8", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # and with overwrite a good export replaces it
    export_model(tiny_bert_dir, fmt="hf", out_dir=out, overwrite=True)
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_hf_export_of_causal_lm(tiny_tokenizer, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=16, n_layer=2, n_head=2, n_positions=32,
                     bos_token_id=None, eos_token_id=None)  # fmt: skip
    src = tmp_path / "lm"
    GPT2LMHeadModel(cfg).save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    parity = export_model(src, fmt="hf", out_dir=tmp_path / "out")
    assert parity["backends"]["hf"]["max_abs_logit_diff"] == 0.0
    assert json.loads((tmp_path / "out" / "kdistill.json").read_text())["task"] == "causal-lm"
    with pytest.raises(UserError, match="model dirs only"):
        export_model(src, fmt="onnx", out_dir=tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()


def test_export_dot_from_inside_and_outside_a_model_dir(tiny_bert_dir, tmp_path, monkeypatch, capsys):
    import shutil

    from kdistill.cli import main

    monkeypatch.chdir(tmp_path)  # not a model dir: one line, exit 2, nothing written
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "."])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "no config.json" in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]

    model = tmp_path / "model"
    shutil.copytree(tiny_bert_dir, model)
    monkeypatch.chdir(model)  # a model dir: `.` exports beside it, as any other path would
    main(["export", ".", "--format", "hf"])
    assert (tmp_path / "model-hf" / "model.safetensors").is_file()
