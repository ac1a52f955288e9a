"""GGUF export of causal-LM students: the file reloads (transformers; llama.cpp where installed) with the source's
token ids and log-probs, follows llama.cpp's layout, and anything else is refused with nothing written."""

from __future__ import annotations

import importlib.util
import json
import sys
import types

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, TokenType
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import kdistill
from kdistill.cli import main
from kdistill.deploy import gguf as gguf_export
from kdistill.deploy.export import SAMPLE_TEXTS, export_model
from kdistill.errors import UserError
from kdistill.models import save_model
from tests.conftest import make_docs, tiny_gpt2
from tests.test_instruction import CHATML, chat_tokenizer  # noqa: F401 - chat_tokenizer is a fixture

LAYOUTS = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


def tiny_lm_dir(path, tokenizer, arch: str, *, tied: bool, task: str = "causal-lm", **config):
    """A random 2-layer decoder (hidden 64, 4 query heads over 2 KV heads) saved as kdistill saves a student. Norm
    gains and biases are drawn too (they start at 1 and 0), so a file that mixes them up cannot pass."""
    config_class, model_class = LAYOUTS[arch]
    torch.manual_seed(0)
    model = model_class(config_class(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tied,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **config)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.3 * torch.randn_like(p))
    return save_model(model, tokenizer, path, {"task": task, "max_length": 128, "role": "student"})


@pytest.fixture(scope="module")
def bos_tokenizer():
    """A byte-level BPE that puts <s> in front of every text, as Llama tokenizers do (tests.conftest.bpe_tokenizer
    adds nothing)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(make_docs(60), trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>",
                                   model_max_length=128)


def fields(path) -> tuple[dict, dict]:
    """(metadata key -> value, tensor name -> tensor) of a GGUF file, as gguf's own reader sees them."""
    reader = GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items()}, {t.name: t for t in reader.tensors}


def reload_log_probs(out, source_dir, texts):
    """Max |Δ log p| between the source dir and the GGUF file read by transformers, on the source's ids; and the
    ids each tokenizer gives (truncated as the export's check truncates: the dirs' max_length, 128)."""
    source = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32).eval()
    reloaded = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32).eval()
    tokenizers = AutoTokenizer.from_pretrained(source_dir), AutoTokenizer.from_pretrained(out, gguf_file="model.gguf")
    ids, gguf_ids = ([tok(t, truncation=True, max_length=128)["input_ids"] for t in texts] for tok in tokenizers)
    worst = 0.0
    for row in ids:
        with torch.inference_mode():
            a = source(input_ids=torch.tensor([row])).logits.log_softmax(-1)
            b = reloaded(input_ids=torch.tensor([row])).logits.log_softmax(-1)
        worst = max(worst, float((a - b).abs().max()))
    return worst, ids, gguf_ids


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_f32_file_reloads_with_the_same_ids_and_log_probs(tmp_path, bpe_tokenizer, bos_tokenizer, arch, tied):
    tokenizer = bos_tokenizer if arch == "llama" else bpe_tokenizer
    src = tiny_lm_dir(tmp_path / "student", tokenizer, arch, tied=tied)
    parity = export_model(src, fmt="gguf", out_dir=tmp_path / "out")

    entry = parity["backends"]["gguf"]
    assert entry["max_abs_logprob_diff"] <= gguf_export.PARITY_ATOL and entry["texts_with_other_ids"] == 0
    assert entry["argmax_agreement"] == 1.0 and parity["n_texts"] == len(SAMPLE_TEXTS) and parity["atol"] == 1e-4
    worst, ids, gguf_ids = reload_log_probs(tmp_path / "out", src, SAMPLE_TEXTS)  # checked here too, not taken on trust
    assert worst <= 1e-4 and ids == gguf_ids
    assert all(row[0] == 1 for row in ids) == (arch == "llama")  # the BOS the tokenizer adds survives

    meta, tensors = fields(tmp_path / "out" / "model.gguf")
    assert meta["general.architecture"] == arch and meta["general.file_type"] == 0  # ALL_F32
    assert meta[f"{arch}.attention.head_count"] == 4 and meta[f"{arch}.attention.head_count_kv"] == 2
    assert meta[f"{arch}.block_count"] == 2 and meta[f"{arch}.embedding_length"] == 64
    assert meta[f"{arch}.feed_forward_length"] == 128 and meta[f"{arch}.context_length"] == 128
    assert meta[f"{arch}.rope.dimension_count"] == 16 and meta[f"{arch}.vocab_size"] == len(tokenizer)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == ("gpt-2" if arch == "llama"
                                                                                      else "qwen2")
    assert meta["tokenizer.ggml.tokens"] == [tokenizer.convert_ids_to_tokens(i) for i in range(len(tokenizer))]
    assert meta["tokenizer.ggml.add_bos_token"] == (arch == "llama") and not meta["tokenizer.ggml.add_eos_token"]
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert meta["tokenizer.ggml.token_type"][tokenizer.eos_token_id] == TokenType.CONTROL
    assert len(meta["tokenizer.ggml.merges"]) > 0
    assert ("output.weight" in tensors) == (not tied) and "token_embd.weight" in tensors
    assert ("blk.0.attn_q.bias" in tensors) == (arch == "qwen2")
    assert {t.tensor_type for t in tensors.values()} == {GGMLQuantizationType.F32}

    # for `llama`, llama.cpp's rotary pairs adjacent rows: row 2i of a head holds HF's row i, row 2i + 1 HF's row
    # i + head_dim / 2 (LlamaModel.permute); `qwen2` is rotated the HF way and stored as it is
    weights = AutoModelForCausalLM.from_pretrained(src).model.layers[0].self_attn.k_proj.weight.detach().numpy()
    stored = np.asarray(tensors["blk.0.attn_k.weight"].data).reshape(weights.shape)
    interleaved = [head * 16 + (j // 2 if j % 2 == 0 else 8 + j // 2) for head in range(2) for j in range(16)]
    assert np.array_equal(stored, weights[interleaved] if arch == "llama" else weights)
    assert not np.array_equal(weights[interleaved], weights)

    saved = json.loads((tmp_path / "out" / "kdistill.json").read_text())
    assert saved["task"] == "causal-lm" and saved["export"]["format"] == "gguf" and saved["export"]["outtype"] == "f32"
    assert saved["export"]["size_bytes"] == (tmp_path / "out" / "model.gguf").stat().st_size
    assert json.loads((tmp_path / "out" / "parity.json").read_text())["versions"]["gguf"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["kdistill.json", "model.gguf", "parity.json"]


def test_f16_stores_half_precision_matrices_and_records_what_the_rounding_costs(tmp_path, bpe_tokenizer):
    src = tiny_lm_dir(tmp_path / "student", bpe_tokenizer, "llama", tied=True)
    f32 = export_model(src, fmt="gguf", out_dir=tmp_path / "f32")
    f16 = export_model(src, fmt="gguf", out_dir=tmp_path / "f16", outtype="f16")

    meta, tensors = fields(tmp_path / "f16" / "model.gguf")
    assert meta["general.file_type"] == 1  # MOSTLY_F16
    for name, tensor in tensors.items():  # norms stay F32, as llama.cpp needs
        assert tensor.tensor_type == (GGMLQuantizationType.F32 if name.endswith("norm.weight")
                                      else GGMLQuantizationType.F16), name
    assert f16["backends"]["gguf"]["size_bytes"] < 0.55 * f32["backends"]["gguf"]["size_bytes"]
    assert f16["backends"]["gguf"]["max_abs_logprob_diff"] <= 1e-4  # exact against the weights it stores
    assert 0.0 < f16["f16_rounding"]["max_abs_logprob_diff"] < 0.05 and "f16_rounding" not in f32
    worst, _, _ = reload_log_probs(tmp_path / "f16", src, SAMPLE_TEXTS)
    assert worst == pytest.approx(f16["f16_rounding"]["max_abs_logprob_diff"], rel=1e-3)


def test_an_instruction_student_keeps_its_chat_template_and_special_tokens(tmp_path, chat_tokenizer):
    src = tiny_lm_dir(tmp_path / "student", chat_tokenizer, "qwen2", tied=True, task="instruction")
    parity = export_model(src, fmt="gguf", out_dir=tmp_path / "out")
    assert parity["chat_template_sample"] and parity["backends"]["gguf"]["texts_with_other_ids"] == 0

    meta, _ = fields(tmp_path / "out" / "model.gguf")
    assert meta["tokenizer.chat_template"] == CHATML
    control = [i for i, kind in enumerate(meta["tokenizer.ggml.token_type"]) if kind == TokenType.CONTROL]
    assert control == sorted(chat_tokenizer.all_special_ids)  # <|endoftext|>, <|im_start|>, <|im_end|>; the rest NORMAL
    chat = chat_tokenizer.apply_chat_template([{"role": "user", "content": "the team won"}], tokenize=False,
                                              add_generation_prompt=True)
    _, ids, gguf_ids = reload_log_probs(tmp_path / "out", src, [chat])
    assert ids == gguf_ids and ids[0].count(chat_tokenizer.convert_tokens_to_ids("<|im_start|>")) == 2


def test_cli_and_python_verb_export_gguf(tmp_path, bpe_tokenizer, capsys):
    src = tiny_lm_dir(tmp_path / "student", bpe_tokenizer, "qwen2", tied=False)
    main(["export", str(src), "--format", "gguf"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["out"] == str(tmp_path / "student-gguf") and printed["format"] == "gguf"
    assert (tmp_path / "student-gguf" / "model.gguf").is_file()

    parity = kdistill.export(src, format="gguf", outtype="f16")  # the verb, with the command's arguments
    assert parity["out_dir"] == str(tmp_path / "student-gguf-f16") and "f16_rounding" in parity
    assert json.loads((tmp_path / "student-gguf-f16" / "kdistill.json").read_text())["export"]["outtype"] == "f16"


def refused(capsys, tmp_path, *args) -> str:
    """Run `kdistill export ...`: exit code 2, one line on stderr, and no file or temp dir written beside the
    model dirs."""
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SystemExit) as exit_info:
        main(["export", *map(str, args)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    return err


def test_other_models_and_options_are_refused_before_anything_is_written(tmp_path, tiny_bert_dir, bpe_tokenizer,
                                                                         capsys):
    import shutil

    encoder = shutil.copytree(tiny_bert_dir, tmp_path / "encoder")
    err = refused(capsys, tmp_path, encoder, "--format", "gguf")
    assert "GGUF export is for causal-LM model dirs (causal-lm, instruction); this one is task 'classification'" in err

    gpt2 = tmp_path / "gpt2"
    save_model(tiny_gpt2(bpe_tokenizer), bpe_tokenizer, gpt2, {"task": "causal-lm", "max_length": 64})
    err = refused(capsys, tmp_path, gpt2, "--format", "gguf")
    assert "supports llama (LlamaForCausalLM), qwen2 (Qwen2ForCausalLM); this model is 'gpt2'" in err

    scaled = tiny_lm_dir(tmp_path / "scaled", bpe_tokenizer, "llama", tied=True, rope_parameters={
        "rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    assert "does not support a llama model with rope scaling" in refused(capsys, tmp_path, scaled, "--format", "gguf")
    assert "unknown GGUF outtype 'q8_0'; choose f32 or f16" in refused(
        capsys, tmp_path, scaled, "--format", "gguf", "--outtype", "q8_0")
    assert "outtype='f16' is for fmt='gguf'" in refused(capsys, tmp_path, scaled, "--format", "hf", "--outtype", "f16")


def test_a_file_that_would_answer_differently_is_not_written(tmp_path, bpe_tokenizer, monkeypatch):
    src = tiny_lm_dir(tmp_path / "student", bpe_tokenizer, "llama", tied=True)
    with monkeypatch.context() as patched:  # Q/K rows as HF keeps them: llama.cpp's rotary would pair them wrongly
        patched.setattr(gguf_export, "_permute", lambda weights, n_head: weights)
        with pytest.raises(UserError, match=r"gguf's next-token log-probs differ from PyTorch by up to .* "
                                            r"\(> atol 0.0001\); nothing was written"):
            export_model(src, fmt="gguf", out_dir=tmp_path / "out")
    with monkeypatch.context() as patched:  # a BOS flag the tokenizer does not follow: every text gets another id
        patched.setattr(gguf_export, "_adds_special_tokens", lambda tokenizer: {"bos": True, "eos": False})
        with pytest.raises(UserError, match=r"gguf's tokenizer encodes 8 of 8 texts to other ids"):
            export_model(src, fmt="gguf", out_dir=tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]  # no out dir, no temp dir


class FakeLlama:
    """llama_cpp.Llama's surface the check uses, computing with transformers over the same file."""

    def __init__(self, model_path, n_ctx, logits_all, verbose):
        from pathlib import Path

        path = Path(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        self.tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        assert logits_all and n_ctx > 0 and not verbose

    def tokenize(self, text: bytes, add_bos: bool, special: bool):
        return self.tokenizer(text.decode("utf-8"))["input_ids"]

    def reset(self):
        self.scores = None

    def eval(self, ids):
        with torch.inference_mode():
            self.scores = self.model(input_ids=torch.tensor([ids])).logits[0].numpy() + 7.0  # logits, not log-probs


def test_llama_cpp_comparison_is_recorded_and_enforced(tmp_path, bpe_tokenizer, monkeypatch):
    src = tiny_lm_dir(tmp_path / "student", bpe_tokenizer, "qwen2", tied=True)
    if importlib.util.find_spec("llama_cpp") is None:
        parity = export_model(src, fmt="gguf", out_dir=tmp_path / "plain")
        assert parity["backends"]["llama.cpp"] == {
            "skipped": "llama-cpp-python is not installed (pip install llama-cpp-python runs this check too)"}
    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(Llama=FakeLlama, __version__="0.0-fake"))
    parity = export_model(src, fmt="gguf", out_dir=tmp_path / "fake")
    entry = parity["backends"]["llama.cpp"]
    assert entry["reader"] == "llama-cpp-python 0.0-fake" and entry["texts_with_other_ids"] == 0
    assert entry["max_abs_logprob_diff"] < 1e-4 and entry["argmax_agreement"] == 1.0

    monkeypatch.setattr(FakeLlama, "tokenize", lambda self, text, add_bos, special: [0])
    with pytest.raises(UserError, match="llama.cpp's tokenizer encodes 8 of 8 texts to other ids"):
        export_model(src, fmt="gguf", out_dir=tmp_path / "other-ids")
    assert not (tmp_path / "other-ids").exists()


def test_llama_cpp_reads_the_file_as_transformers_does(tmp_path, bos_tokenizer):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed; the GGUF file is then checked by "
                                            "transformers' GGUF loader only")
    src = tiny_lm_dir(tmp_path / "student", bos_tokenizer, "llama", tied=False)
    entry = export_model(src, fmt="gguf", out_dir=tmp_path / "out")["backends"]["llama.cpp"]
    assert "skipped" not in entry and entry["texts_with_other_ids"] == 0
    assert entry["max_abs_logprob_diff"] <= gguf_export.LLAMA_CPP_ATOL
