"""student.build_student: exact copies, layer selection, width pruning that keeps what matters, and a training race."""

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
    Qwen2Config,
    Qwen2ForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from tests.conftest import LABELS, make_toy_examples, tiny_bert_config
from kdistill.student import (
    build_student,
    check_layers,
    count_parameters,
    describe_student,
    find_layer_list,
    importance_scores,
    select_layers,
)


def encode(tokenizer, rows):
    enc = tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")
    labels = torch.tensor([LABELS.index(r["label"]) for r in rows])
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def inputs_only(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


@pytest.fixture(scope="module")
def train_batch(tiny_tokenizer, toy_examples):
    return encode(tiny_tokenizer, toy_examples)


@pytest.fixture(scope="module")
def heldout_batch(tiny_tokenizer):
    return encode(tiny_tokenizer, make_toy_examples(60, seed=1))


def fit(model, batch, *, steps, lr, seed, batch_size=16):
    """`steps` AdamW steps on random minibatches of `batch`, the order fixed by `seed`."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    n = len(batch["labels"])
    for _ in range(steps):
        idx = torch.randperm(n, generator=gen)[:batch_size]
        loss = model(**{k: v[idx] for k, v in batch.items()}).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained_teacher(tiny_tokenizer, train_batch):
    """The 4-layer, 32-wide conftest BERT, trained on the toy task until it separates all three classes."""
    torch.manual_seed(0)
    cfg = tiny_bert_config(tiny_tokenizer, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return fit(BertForSequenceClassification(cfg), train_batch, steps=80, lr=1e-3, seed=0)


def heldout(model, batch):
    with torch.no_grad():
        out = model(**batch)
    return out.loss.item(), (out.logits.argmax(-1) == batch["labels"]).float().mean().item()


def tiny_roberta(tokenizer, layers=4):
    cfg = RobertaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, num_labels=3, pad_token_id=tokenizer.pad_token_id,
        id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)},
    )
    torch.manual_seed(1)
    return RobertaForSequenceClassification(cfg).eval()


def tiny_gpt2(tokenizer, layers=4):
    cfg = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=layers, n_head=4, n_positions=64, bos_token_id=2,
                     eos_token_id=3)
    torch.manual_seed(2)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(tokenizer, layers=4):
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64, bos_token_id=2,
                      eos_token_id=3, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(3)
    return LlamaForCausalLM(cfg).eval()


def tiny_bert(tokenizer, layers=4):
    torch.manual_seed(4)
    return BertForSequenceClassification(tiny_bert_config(tokenizer, num_hidden_layers=layers)).eval()


def layer_state(model, i):
    _, layer_list = find_layer_list(model)
    return layer_list[i].state_dict()


# ------------------------------------------------------------------------------------------- depth


@pytest.mark.parametrize("make", [tiny_bert, tiny_roberta, tiny_gpt2, tiny_llama])
def test_all_layers_full_width_reproduces_teacher(make, tiny_tokenizer, train_batch):
    teacher = make(tiny_tokenizer)
    student = build_student(teacher)
    assert type(student) is type(teacher)
    assert student is not teacher
    batch = inputs_only(train_batch)
    with torch.no_grad():
        assert torch.equal(student(**batch).logits, teacher(**batch).logits)
    # A copy, not shared tensors: training the student must not move the teacher.
    assert all(ps.data_ptr() != pt.data_ptr() for ps, pt in zip(student.parameters(), teacher.parameters()))


def test_two_layer_student_has_layers_0_and_3(tiny_tokenizer):
    teacher = tiny_bert(tiny_tokenizer)
    student = build_student(teacher, layers=[0, 3])
    assert student.config.num_hidden_layers == 2 and len(student.bert.encoder.layer) == 2
    for s_i, t_i in ((0, 0), (1, 3)):
        for name, value in layer_state(student, s_i).items():
            assert torch.equal(value, layer_state(teacher, t_i)[name]), name
    s_state, t_state = student.state_dict(), teacher.state_dict()
    layer1 = "bert.encoder.layer.1.output.dense.weight"
    assert not torch.equal(s_state[layer1], t_state[layer1])  # student layer 1 is teacher layer 3, not 1
    for name in ("bert.embeddings.word_embeddings.weight", "bert.pooler.dense.weight", "classifier.weight"):
        assert torch.equal(s_state[name], t_state[name]), name
    assert student.config.id2label == teacher.config.id2label == dict(enumerate(LABELS))
    assert student.config.label2id == teacher.config.label2id
    assert teacher.config.num_hidden_layers == 4  # the teacher's config is not touched
    assert student.kdistill_init["teacher_layers"] == [0, 3]


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama])
def test_depth_selection_for_decoders(make, tiny_tokenizer, train_batch):
    teacher = make(tiny_tokenizer)
    student = build_student(teacher, num_layers=2)  # uniform: [0, 3]
    assert student.config.num_hidden_layers == 2
    for s_i, t_i in ((0, 0), (1, 3)):
        for name, value in layer_state(student, s_i).items():
            assert torch.equal(value, layer_state(teacher, t_i)[name]), name
    logits = student(input_ids=train_batch["input_ids"][:2]).logits
    assert logits.shape == (2, train_batch["input_ids"].shape[1], len(tiny_tokenizer))
    if isinstance(student, GPT2LMHeadModel):  # the LM head stays tied to the input embeddings
        assert student.lm_head.weight.data_ptr() == student.transformer.wte.weight.data_ptr()


def test_per_layer_config_lists_follow_the_selection(tiny_tokenizer):
    cfg = Qwen2Config(vocab_size=len(tiny_tokenizer), hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, bos_token_id=2, eos_token_id=3,
                      layer_types=["full_attention", "sliding_attention", "full_attention", "sliding_attention"])
    teacher = Qwen2ForCausalLM(cfg).eval()
    student = build_student(teacher, layers=[1, 2])
    assert student.config.layer_types == ["sliding_attention", "full_attention"]


@pytest.mark.parametrize(
    ("teacher_layers", "n", "layer_map", "expected"),
    [
        (6, 2, "uniform", [0, 5]),
        (12, 6, "uniform", [0, 2, 4, 7, 9, 11]),
        (4, 3, "uniform", [0, 2, 3]),
        (4, 4, "uniform", [0, 1, 2, 3]),
        (4, 1, "uniform", [3]),
        (12, 3, "first", [0, 1, 2]),
        (12, 3, "last", [9, 10, 11]),
    ],
)
def test_select_layers(teacher_layers, n, layer_map, expected):
    assert select_layers(teacher_layers, n, layer_map) == expected


@pytest.mark.parametrize("t", [3, 5, 7, 12, 24])
def test_uniform_selection_always_spans_first_to_last(t):
    for n in range(2, t + 1):
        chosen = select_layers(t, n)
        assert chosen[0] == 0 and chosen[-1] == t - 1 and len(set(chosen)) == n and chosen == sorted(chosen)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_layers=5), r"num_layers=5 .*4 layers"),
        (dict(num_layers=0), r"num_layers=0"),
        (dict(num_layers=2, layer_map="middle"), r"layer_map='middle'"),
    ],
)
def test_select_layers_errors_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        select_layers(4, kwargs.pop("num_layers"), **kwargs)


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ([0, 7], r"index 7 is out of range .*4 layers"),
        ([-1, 2], r"index -1 is out of range"),
        ([1, 1, 2], r"index 1 appears more than once"),
        ([3, 1], r"layers=\[3, 1\] must be in ascending order"),
        ([], r"empty"),
        ([0, 1.5], r"1.5 is not an integer"),
    ],
)
def test_explicit_layers_validation(layers, message, tiny_tokenizer):
    with pytest.raises(ValueError, match=message):
        check_layers(layers, 4)
    with pytest.raises(ValueError, match=message):
        build_student(tiny_bert(tiny_tokenizer), layers=layers)


def test_build_student_argument_errors(tiny_tokenizer):
    teacher = tiny_bert(tiny_tokenizer)
    with pytest.raises(ValueError, match=r"num_layers=9"):
        build_student(teacher, num_layers=9)
    with pytest.raises(ValueError, match=r"num_layers=3 disagrees with layers=\[0, 3\]"):
        build_student(teacher, num_layers=3, layers=[0, 3])
    with pytest.raises(ValueError, match=r"init='distilled'"):
        build_student(teacher, init="distilled")
    with pytest.raises(ValueError, match=r"init='pruned' needs a width"):
        build_student(teacher, num_layers=2, init="pruned")


# ------------------------------------------------------------------------------------------- width


def test_width_errors_name_the_value(tiny_tokenizer):
    teacher = tiny_bert(tiny_tokenizer)  # hidden 32, 4 heads of 8
    with pytest.raises(ValueError, match=r"hidden_size=20 is not a multiple of the teacher's head size 8"):
        build_student(teacher, hidden_size=20)
    with pytest.raises(ValueError, match=r"hidden_size=64 is larger than the teacher's 32"):
        build_student(teacher, hidden_size=64)
    with pytest.raises(ValueError, match=r"hidden_size=16 with num_attention_heads=3"):
        build_student(teacher, hidden_size=16, num_attention_heads=3)
    with pytest.raises(ValueError, match=r"intermediate_size=0"):
        build_student(teacher, intermediate_size=0)
    with pytest.raises(NotImplementedError, match=r"'gpt2' \(GPT2LMHeadModel\)"):
        build_student(tiny_gpt2(tiny_tokenizer), hidden_size=16)
    with pytest.raises(ValueError, match=r"num_key_value_heads=1 applies to decoders with grouped-query attention"):
        build_student(teacher, num_key_value_heads=1)  # Llama-family width: tests/test_decoder_width.py


@pytest.mark.parametrize("make", [tiny_bert, tiny_roberta])
def test_width_reduced_student_shapes_and_forward(make, tiny_tokenizer, train_batch):
    teacher = make(tiny_tokenizer)
    calib = inputs_only(train_batch)
    student = build_student(teacher, num_layers=2, hidden_size=24, intermediate_size=40, calibration_inputs=calib)
    cfg = student.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (2, 24, 3, 40)
    base = student.base_model
    layer = base.encoder.layer[1]
    assert layer.attention.self.query.weight.shape == (24, 24)
    assert layer.attention.self.attention_head_size == 8  # the teacher's head size
    assert layer.intermediate.dense.weight.shape == (40, 24)
    assert layer.output.dense.weight.shape == (24, 40)
    assert base.embeddings.word_embeddings.weight.shape == (len(tiny_tokenizer), 24)
    assert student(**calib).logits.shape == (len(train_batch["labels"]), 3)
    assert student.config.id2label == teacher.config.id2label
    assert student.kdistill_init["ranking"] == "activations"
    # Heads alone: hidden follows (heads × head size).
    assert build_student(teacher, num_attention_heads=2).config.hidden_size == 16


def test_pruned_student_is_closer_to_teacher_than_random(trained_teacher, train_batch):
    calib = inputs_only(train_batch)
    shape = dict(layers=[0, 3], hidden_size=24, intermediate_size=32)
    pruned = build_student(trained_teacher, init="pruned", calibration_inputs=calib, **shape).eval()
    random = build_student(trained_teacher, init="random", **shape).eval()
    assert [p.shape for p in pruned.parameters()] == [p.shape for p in random.parameters()]
    with torch.no_grad():
        target = trained_teacher(**calib).logits
        err_pruned = (pruned(**calib).logits - target).pow(2).mean()
        err_random = (random(**calib).logits - target).pow(2).mean()
    assert err_pruned < 0.5 * err_random


def test_dead_units_are_pruned_and_ffn_pruning_is_exact(tiny_tokenizer, train_batch):
    """Units that never activate rank last; dropping dead FFN neurons leaves the function unchanged."""
    teacher = tiny_bert(tiny_tokenizer)
    calib = inputs_only(train_batch)
    dead_neurons = torch.arange(0, 64, 2)  # every other neuron of every layer: zero in-weights and bias → GELU(0) = 0
    dead_head = 1  # head 1 of layer 2: zero value weights and bias → zero context
    with torch.no_grad():
        for layer in teacher.bert.encoder.layer:
            layer.intermediate.dense.weight[dead_neurons] = 0
            layer.intermediate.dense.bias[dead_neurons] = 0
        value = teacher.bert.encoder.layer[2].attention.self.value
        value.weight[dead_head * 8 : (dead_head + 1) * 8] = 0
        value.bias[dead_head * 8 : (dead_head + 1) * 8] = 0
        for norm in [m for m in teacher.modules() if isinstance(m, nn.LayerNorm)]:  # channel 0 silenced everywhere
            norm.weight.copy_(torch.linspace(0.5, 1.5, 32))  # distinct gains, so kept channels can be told apart
            norm.weight[0] = 0
            norm.bias[0] = 0

    scores = importance_scores(teacher, [0, 1, 2, 3], calib)
    assert scores["source"] == "activations"
    assert int(scores["heads"][2].argmin()) == dead_head
    assert set(scores["neurons"][0].topk(32).indices.tolist()) == set(range(1, 64, 2))
    assert int(scores["hidden"].argmin()) == 0 and scores["hidden"][0] == 0

    student = build_student(teacher, intermediate_size=32, calibration_inputs=calib)
    with torch.no_grad():
        torch.testing.assert_close(student(**calib).logits, teacher(**calib).logits, atol=1e-5, rtol=1e-5)
    kept_rows = student.bert.encoder.layer[1].intermediate.dense.weight
    torch.testing.assert_close(kept_rows, teacher.bert.encoder.layer[1].intermediate.dense.weight[1::2])
    narrow = build_student(teacher, num_attention_heads=3, calibration_inputs=calib)
    kept_value = narrow.bert.encoder.layer[2].attention.self.value.weight
    assert not (kept_value.abs().sum(dim=1) == 0).any()  # the dead head was the one dropped
    assert narrow.config.hidden_size == 24
    assert (narrow.bert.embeddings.LayerNorm.weight != 0).all()  # and channel 0 was dropped from the residual stream
    t_gain, s_gain = teacher.bert.embeddings.LayerNorm.weight, narrow.bert.embeddings.LayerNorm.weight
    kept = [c for c in range(32) if (t_gain[c] == s_gain).any()]
    assert len(kept) == 24 and 0 not in kept
    t_emb, s_emb = teacher.bert.embeddings.word_embeddings.weight, narrow.bert.embeddings.word_embeddings.weight
    torch.testing.assert_close(s_emb, t_emb[:, kept])


def test_weight_magnitude_fallback_is_logged(tiny_tokenizer, caplog):
    teacher = tiny_bert(tiny_tokenizer)
    with caplog.at_level(logging.INFO, logger="kdistill.student"):
        student = build_student(teacher, hidden_size=16, intermediate_size=32)
    assert student.kdistill_init["ranking"] == "weights"
    messages = [r.getMessage() for r in caplog.records]
    assert any("no calibration inputs" in m and "weight magnitude" in m for m in messages)


def test_pruned_init_beats_random_after_equal_training(trained_teacher, train_batch, heldout_batch):
    teacher_loss, teacher_acc = heldout(trained_teacher, heldout_batch)
    assert teacher_acc > 0.9  # otherwise the race below means little
    shape = dict(layers=[0, 3], hidden_size=16, intermediate_size=32)
    results = {}
    for init in ("pruned", "random"):
        calib = inputs_only(train_batch)
        student = build_student(trained_teacher, init=init, calibration_inputs=calib, seed=0, **shape)
        fit(student, train_batch, steps=15, lr=1e-3, seed=1)
        results[init] = heldout(student, heldout_batch)
    assert results["pruned"][0] < results["random"][0] - 0.1, results
    assert results["pruned"][1] > results["random"][1], results


# ------------------------------------------------------------------------------------------- random, reports


def test_random_init_is_deterministic_and_leaves_global_rng_alone(tiny_tokenizer):
    teacher = tiny_bert(tiny_tokenizer)
    rng_before = torch.get_rng_state()
    a = build_student(teacher, num_layers=2, hidden_size=16, init="random", seed=3)
    b = build_student(teacher, num_layers=2, hidden_size=16, init="random", seed=3)
    c = build_student(teacher, num_layers=2, hidden_size=16, init="random", seed=4)
    assert torch.equal(torch.get_rng_state(), rng_before)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    query = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(sa[query], sc[query])
    full = build_student(teacher, init="random", seed=3)
    assert not torch.equal(full.bert.encoder.layer[0].attention.self.query.weight,
                           teacher.bert.encoder.layer[0].attention.self.query.weight)


def test_count_parameters_and_describe(tiny_tokenizer):
    gpt2 = tiny_gpt2(tiny_tokenizer)
    # Tied LM head counted once.
    assert count_parameters(gpt2) == sum(p.numel() for n, p in gpt2.named_parameters() if n != "lm_head.weight")
    lin = nn.Linear(3, 2)
    lin.bias.requires_grad_(False)
    assert count_parameters(lin) == 8 and count_parameters(lin, trainable_only=True) == 6

    teacher = tiny_bert(tiny_tokenizer)
    student = build_student(teacher, num_layers=2, hidden_size=16, intermediate_size=32)
    info = describe_student(teacher, student)
    assert info["teacher"] | {"params": 0} == {"layers": 4, "hidden": 32, "heads": 4, "ffn": 64, "params": 0}
    assert info["student"] | {"params": 0} == {"layers": 2, "hidden": 16, "heads": 2, "ffn": 32, "params": 0}
    assert info["teacher"]["params"] == count_parameters(teacher)
    assert info["student"]["params"] == count_parameters(student)
    assert info["param_ratio"] == pytest.approx(count_parameters(student) / count_parameters(teacher))
    assert info["init"]["teacher_layers"] == [0, 3]
    assert describe_student(gpt2, build_student(gpt2, num_layers=1))["student"]["ffn"] == 4 * 32
