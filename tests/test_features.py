"""features.capture on tiny random models of each supported family: counts, shapes, exact Q/K/V, no side effects."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from transformers import (
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MPNetConfig,
    MPNetForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from kdistill.features import Features, capture, ensure_eager_attention, find_qkv_modules

from tests.conftest import tiny_bert_config

LAYERS, HIDDEN, HEADS = 3, 32, 4


def _encoder_kwargs(tokenizer):
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
        pad_token_id=tokenizer.pad_token_id,
    )


def make_model(family: str, tokenizer) -> nn.Module:
    torch.manual_seed(0)
    if family == "bert":
        model = BertForSequenceClassification(tiny_bert_config(tokenizer, num_hidden_layers=LAYERS))
    elif family == "roberta":
        model = RobertaForSequenceClassification(RobertaConfig(**_encoder_kwargs(tokenizer)))
    elif family == "mpnet":
        model = MPNetForSequenceClassification(MPNetConfig(**_encoder_kwargs(tokenizer)))
    elif family == "gpt2":
        cfg = GPT2Config(vocab_size=len(tokenizer), n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=64,
                         bos_token_id=2, eos_token_id=3)
        model = GPT2LMHeadModel(cfg)
    elif family == "llama":  # grouped-query attention: 4 query heads share 2 key/value heads
        cfg = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
            num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64, bos_token_id=2,
            eos_token_id=3, pad_token_id=tokenizer.pad_token_id,
        )
        model = LlamaForCausalLM(cfg)
    else:
        raise AssertionError(family)
    return model.eval()


@pytest.fixture(scope="module")
def batch(tiny_tokenizer, toy_examples):
    texts = [r["text"] for r in toy_examples[:3]] + ["goal"]  # the short one is padded
    enc = tiny_tokenizer(texts, padding=True, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any()
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _no_hooks(model: nn.Module) -> bool:
    """No hook of ours is left. Transformers 5 itself installs persistent output-capturing hooks on layers the first
    time output_hidden_states/output_attentions is used, so "no hooks at all" only holds for the Q/K/V projections."""
    for m in model.modules():
        for hook in [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]:
            if getattr(hook, "__module__", "").startswith("kdistill"):
                return False
    projections = [p for layer in find_qkv_modules(model) for p in layer.values()]
    return all(not p._forward_hooks and not p._forward_pre_hooks for p in projections)


ALL = ["bert", "roberta", "mpnet", "gpt2", "llama"]


@pytest.mark.parametrize("family", ALL)
def test_capture_counts_shapes_and_attention_rows(family, tiny_tokenizer, batch):
    model = make_model(family, tiny_tokenizer)
    feats = capture(model, batch, hidden_states=True, attentions=True, qkv=True)
    B, L = batch["input_ids"].shape
    assert isinstance(feats, Features)
    assert len(feats.hidden_states) == LAYERS + 1
    assert all(h.shape == (B, L, HIDDEN) for h in feats.hidden_states)
    assert len(feats.attentions) == LAYERS
    for a in feats.attentions:
        assert a.shape == (B, HEADS, L, L)
        torch.testing.assert_close(a.sum(-1), torch.ones(B, HEADS, L))
    # Padding keys get no attention from real queries.
    pad = batch["attention_mask"] == 0
    assert feats.attentions[0][pad.nonzero()[0, 0], :, 0][:, pad[pad.nonzero()[0, 0]]].abs().max() < 1e-6
    assert len(feats.qkv) == LAYERS
    kv_width = HIDDEN // 2 if family == "llama" else HIDDEN  # GQA: k/v as narrow as the projections make them
    for layer in feats.qkv:
        assert set(layer) == {"query", "key", "value"}
        assert layer["query"].shape == (B, L, HIDDEN)
        assert layer["key"].shape == layer["value"].shape == (B, L, kv_width)
    assert feats.attention_mask is batch["attention_mask"]
    assert _no_hooks(model)


@pytest.mark.parametrize("family", ALL)
def test_capture_leaves_logits_unchanged(family, tiny_tokenizer, batch):
    model = make_model(family, tiny_tokenizer)
    with torch.no_grad():
        plain = model(**batch).logits
        feats = capture(model, batch, hidden_states=True, qkv=True)
    assert torch.equal(feats.logits, plain)  # same attention implementation: bit-identical
    with torch.no_grad():
        eager = capture(model, batch, attentions=True).logits  # switched to eager: same maths, other kernel
    torch.testing.assert_close(eager, plain, atol=1e-5, rtol=1e-5)
    assert _no_hooks(model)


def _layer0_qkv_reference(family, model, h0):
    """What layer 0's Q/K/V projections compute on the embeddings output, by the family's own modules."""
    if family == "bert":
        attn = model.bert.encoder.layer[0].attention.self
        return attn.query(h0), attn.key(h0), attn.value(h0)
    if family == "roberta":
        attn = model.roberta.encoder.layer[0].attention.self
        return attn.query(h0), attn.key(h0), attn.value(h0)
    if family == "mpnet":
        attn = model.mpnet.encoder.layer[0].attention.attn
        return attn.q(h0), attn.k(h0), attn.v(h0)
    if family == "gpt2":
        block = model.transformer.h[0]
        fused = block.attn.c_attn(block.ln_1(h0))
        d = fused.shape[-1] // 3
        return fused[..., :d], fused[..., d : 2 * d], fused[..., 2 * d :]
    layer = model.model.layers[0]
    x = layer.input_layernorm(h0)
    return layer.self_attn.q_proj(x), layer.self_attn.k_proj(x), layer.self_attn.v_proj(x)


@pytest.mark.parametrize("family", ALL)
def test_qkv_are_the_projection_outputs(family, tiny_tokenizer, batch):
    model = make_model(family, tiny_tokenizer)
    with torch.no_grad():
        feats = capture(model, batch, qkv=True)
        q, k, v = _layer0_qkv_reference(family, model, feats.hidden_states[0])
    torch.testing.assert_close(feats.qkv[0]["query"], q)
    torch.testing.assert_close(feats.qkv[0]["key"], k)
    torch.testing.assert_close(feats.qkv[0]["value"], v)
    # Layers are in order: layer 1's query differs from layer 0's.
    assert not torch.allclose(feats.qkv[0]["query"], feats.qkv[1]["query"])


def test_capture_keeps_gradients_for_a_student(tiny_tokenizer, batch):
    model = make_model("bert", tiny_tokenizer)
    feats = capture(model, batch, qkv=True)
    loss = feats.qkv[1]["key"].pow(2).mean() + feats.hidden_states[-1].pow(2).mean()
    loss.backward()
    assert model.bert.encoder.layer[1].attention.self.key.weight.grad is not None


def test_capture_without_extras_returns_empty(tiny_tokenizer, batch):
    model = make_model("bert", tiny_tokenizer)
    feats = capture(model, {"input_ids": batch["input_ids"]}, hidden_states=False)
    assert feats.hidden_states == () and feats.attentions == () and feats.qkv == []
    assert feats.attention_mask is None
    assert feats.logits.shape == (batch["input_ids"].shape[0], 3)


def test_hooks_removed_when_forward_fails(tiny_tokenizer, batch, monkeypatch):
    model = make_model("bert", tiny_tokenizer)

    def boom(*args, **kwargs):
        raise RuntimeError("boom in layer 2")

    monkeypatch.setattr(model.bert.encoder.layer[2].intermediate, "forward", boom)
    with pytest.raises(RuntimeError, match="boom in layer 2"):
        capture(model, batch, qkv=True)
    assert _no_hooks(model)


def test_ensure_eager_attention_switches_and_logs(tiny_tokenizer, batch, caplog):
    model = make_model("bert", tiny_tokenizer)
    assert model.config._attn_implementation != "eager"  # sdpa by default: no attention maps
    with caplog.at_level(logging.INFO, logger="kdistill.features"):
        assert ensure_eager_attention(model) is True
    assert model.config._attn_implementation == "eager"
    assert any("eager" in r.getMessage() and "BertForSequenceClassification" in r.getMessage() for r in caplog.records)
    assert ensure_eager_attention(model) is False  # already eager: nothing to do


def test_attentions_raise_when_eager_is_impossible(tiny_tokenizer, batch, monkeypatch):
    model = make_model("bert", tiny_tokenizer)
    monkeypatch.setattr(model, "set_attn_implementation", lambda impl: None)  # a model that ignores the request
    with pytest.raises(RuntimeError, match='BertForSequenceClassification.*"eager"'):
        capture(model, batch, attentions=True)


def test_qkv_unknown_architecture_names_the_class(batch):
    class TinyNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(ValueError, match="TinyNet: no attention Q/K/V projection"):
        find_qkv_modules(TinyNet())


def test_qkv_matching_is_by_whole_name_components(tiny_tokenizer):
    # A BERT decoder with cross-attention: "crossattention.self.query" must not count as self-attention.
    from transformers import BertLMHeadModel

    cfg = tiny_bert_config(tiny_tokenizer, num_hidden_layers=2, is_decoder=True, add_cross_attention=True)
    model = BertLMHeadModel(cfg)
    layers = find_qkv_modules(model)
    assert len(layers) == 2
    assert layers[1]["query"] is model.bert.encoder.layer[1].attention.self.query
