"""The explicit loop's teacher cache with hidden-state terms: the ragged fp16 store gives back what the teacher
computes, padded like the batch; a cached run trains what a live one trains; and the teacher then runs only while
the cache is built (but every step when an attention term needs it, or the cache would be too big)."""

from __future__ import annotations

import dataclasses
import logging
from types import SimpleNamespace

import pytest
import torch

from kdistill.cache import FeatureStore, logits_key, read_teacher_logits, write_teacher_logits
from kdistill.config import DistillConfig
from kdistill.data import tokenize_splits
from kdistill.strategies import explicit
from kdistill.strategies.explicit import cache_teacher_outputs, distill_explicit, why_not_cached, with_index
from kdistill.errors import UserError
from kdistill.features import capture
from kdistill.terms import TermSpec
from kdistill.training import make_accelerator, make_loader
from tests.helpers import tiny_pair, tiny_train, toy_bundle, toy_encoded
from kdistill.strategies.phase import Phase


def ragged_bundle():
    """toy_bundle with texts of 2 to 6 words, so that batches pad."""
    bundle = toy_bundle()
    for name, split in bundle.splits.items():
        bundle.splits[name] = split.map(lambda row, i: {"text": " ".join(row["text"].split()[: 2 + i % 5])},
                                        with_indices=True)
    return bundle

# ------------------------------------------------------------------------------------------------- the store


def test_the_store_puts_each_examples_real_tokens_back_at_the_batchs_real_positions(tmp_path):
    lengths, width = [3, 1, 4, 2], 5
    store = FeatureStore.create(tmp_path, lengths, [0, 2], width, first_only=False)
    values = {i: torch.randn(n, width) for i, n in enumerate(lengths)}  # example i's token states
    layer_scale = {0: 1.0, 2: -2.0}

    def padded(rows, left: bool):
        mask = torch.zeros(len(rows), max(lengths[r] for r in rows), dtype=torch.long)
        hidden = torch.full((*mask.shape, width), 99.0)  # what a model computes at padding: never stored
        for b, r in enumerate(rows):
            span = slice(mask.shape[1] - lengths[r], None) if left else slice(0, lengths[r])
            mask[b, span] = 1
            hidden[b, span] = values[r]
        return {t: hidden * s for t, s in layer_scale.items()}, mask

    for rows in ([2, 0], [3, 1]):  # written right-padded, in any row order
        hidden, mask = padded(rows, left=False)
        store.put(torch.tensor(rows), hidden, mask)
    store.flush()
    del store
    store = FeatureStore.open(tmp_path)
    assert len(store) == 4 and set(store.layers) == {0, 2} and store.layers[0].dtype.name == "float16"
    for left in (False, True):  # read back into right- and left-padded batches of other compositions
        rows = [1, 2, 3]
        hidden, mask = padded(rows, left)
        got = store.gather(torch.tensor(rows), mask)
        for t in (0, 2):
            expected = torch.where(mask.bool()[..., None], hidden[t], 0.0).half().float()  # zeros at padding
            assert torch.equal(got[t], expected)
    with pytest.raises(ValueError, match="example 2 with 3 real tokens, 4 were cached"):
        store.gather(torch.tensor([2]), torch.ones(1, 3))


def test_a_first_only_store_keeps_one_row_per_example_at_position_0(tmp_path):
    store = FeatureStore.create(tmp_path, [3, 2], [4], 2, first_only=True)
    hidden = torch.arange(12.0).reshape(2, 3, 2)
    store.put([1, 0], {4: hidden}, torch.tensor([[1, 1, 1], [1, 1, 0]]))
    assert FeatureStore.estimate_bytes([3, 2], 1, 2, first_only=True) == 2 * 2 * 2
    got = store.gather([0, 1], torch.tensor([[1, 1], [1, 1]]))[4]
    assert torch.equal(got[:, 0], hidden[[1, 0], 0]) and not got[:, 1].any()


def test_the_cache_equals_the_live_teacher_on_a_shuffled_padded_batch(tmp_path, tiny_tokenizer):
    teacher, _, _ = tiny_pair(tiny_tokenizer)
    teacher.eval()
    spec = TermSpec({"hidden_mse": 1.0, "embedding_mse": 1.0}, pairs=[(1, 2), (2, 4)])
    encoded = with_index(tokenize_splits(ragged_bundle(), tiny_tokenizer, 16)["train"])
    cached = cache_teacher_outputs([teacher], encoded, tiny_tokenizer, make_accelerator(tiny_train()), spec=spec,
                                   store_dir=tmp_path / "features")
    assert sorted(cached.features.layers) == [0, 2, 4]  # only the layers the terms read
    assert cached.features.layers[2].shape == (sum(len(x) for x in encoded["input_ids"]), 32)

    batch = next(iter(make_loader(encoded, tiny_tokenizer, 8, seed=1, shuffle=True)))
    batch.pop("labels")
    idx = batch.pop("idx")
    device = next(teacher.parameters()).device  # (the cache moved the teacher to the run's device)
    batch = {k: v.to(device) for k, v in batch.items()}
    mask = batch["attention_mask"].bool()
    assert not mask.all()  # the batch has padding
    feats, logits = cached.outputs(idx, batch["attention_mask"], device)
    with torch.no_grad():
        live = capture(teacher, batch, hidden_states=True)
    torch.testing.assert_close(logits[0], live.logits, rtol=1e-5, atol=1e-5)
    assert feats.hidden_states[1] is None and feats.hidden_states[3] is None
    for t in (0, 2, 4):
        got = feats.hidden_states[t]
        assert got.dtype == torch.float32 and got.shape == live.hidden_states[t].shape
        torch.testing.assert_close(got[mask], live.hidden_states[t][mask], rtol=1e-3, atol=1e-3)  # fp16
        assert not got[~mask].any()


# ------------------------------------------------------------------------------------------------- the loop


def train_run(tokenizer, cache: str, extra_terms: dict | None = None, teacher_dtype=torch.float32, **train):
    """Steps of tiny_pair's kd + ce + hidden_mse (+ extra_terms), and the order in which teacher and student ran."""
    teacher, student, spec = tiny_pair(tokenizer)
    teacher.to(teacher_dtype)
    spec.weights.update(extra_terms or {})
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append("teacher"))
    student.register_forward_hook(lambda *_: calls.append("student"))
    history = distill_explicit(Phase(student=student, teachers=[teacher], tokenizer=tokenizer,
                                     data=tokenize_splits(ragged_bundle(), tokenizer, 16), spec=spec,
                                     distill=DistillConfig(cache_teacher=cache), train=tiny_train(**train),
                                     task="classification"))
    return history, student, calls


@pytest.mark.parametrize("terms", [{}, {"hidden_mse": 0.0, "cls_pkd": 1.0, "embedding_mse": 1.0}],
                         ids=["hidden_mse", "cls_pkd+embedding_mse"])
def test_a_cached_run_trains_what_a_live_run_trains_and_the_teacher_runs_only_to_build_it(monkeypatch, caplog,
                                                                                             tiny_tokenizer, terms):
    caplog.set_level(logging.INFO, logger="kdistill.strategies.explicit")
    # The cache pass runs the teacher over one batch of 48, the live loop over micro-batches of 4: in float32 the
    # two round differently, by a few ulps that differ from CPU to CPU (kd, nearly 0 here, then differs by 1e-3 of
    # itself). A float64 teacher's outputs differ by ~1e-16 between batch shapes, far below float32's 6e-8
    # resolution, so both runs get the same float32 (and fp16) teacher outputs, on any CPU: what is left to differ
    # is the cache's own fp16 rounding, which the comparisons below are about.
    train = dict(max_steps=3, batch_size=8, grad_accum=2, teacher_dtype=torch.float64)
    live, _, live_calls = train_run(tiny_tokenizer, "off", terms, **train)
    cached, cached_student, cached_calls = train_run(tiny_tokenizer, "auto", terms, **train)
    layers = "[0, 2, 4]" if terms else "[2, 4]"
    assert f"teacher cache: hidden states of teacher layers {layers} for 48 examples" in caplog.text

    assert live_calls.count("teacher") == 3 * 2  # every micro-batch of every step
    first_student = cached_calls.index("student")
    assert cached_calls[:first_student] == ["teacher"]  # one cache batch (48 examples), then never again
    assert "teacher" not in cached_calls[first_student:]

    assert [s["step"] for s in cached.steps] == [1, 2, 3]
    active = [t for t, w in {"kd": 1, "ce": 1, "hidden_mse": 1, **terms}.items() if w]
    for a, b in zip(cached.steps, live.steps):
        assert set(a) == set(b) and set(active) <= set(a)
    for key in [*active, "loss"]:  # the first step, from the same weights: only fp16 hidden states differ
        assert cached.steps[0][key] == pytest.approx(live.steps[0][key], rel=1e-3, abs=1e-6), key

    # The only difference is fp16: a live teacher whose hidden states are rounded to fp16 trains the same student.
    # (Unrounded, the weights differ by ~1% of how far they moved: Adam's first steps are sign-like where a
    # gradient is near 0, so rounding noise there moves a weight by a whole step.)
    def fp16_teacher(model, inputs, **flags):
        feats = capture(model, inputs, **flags)
        if model.training:  # the student
            return feats
        return dataclasses.replace(feats, hidden_states=tuple(h.half().float() for h in feats.hidden_states))

    monkeypatch.setattr(explicit, "capture", fp16_teacher)
    rounded, rounded_student, _ = train_run(tiny_tokenizer, "off", terms, **train)
    for a, b in zip(cached.steps, rounded.steps):  # (equal on CPU; CUDA's backward sums in any order)
        assert a == pytest.approx(b, rel=1e-5, abs=1e-8)
    for a, b in zip(cached_student.parameters(), rounded_student.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_under_bf16_the_teacher_runs_in_bf16_whether_cached_or_live(tiny_tokenizer):
    """train.mixed_precision: bf16 puts the frozen teacher's forward under autocast too (as the student's), in the
    cache pass and in the live loop alike, so caching changes nothing but the fp16 rounding of hidden states."""
    autocast_seen = {}
    runs = {}
    for cache in ("off", "auto"):
        teacher, student, spec = tiny_pair(tiny_tokenizer)
        teacher.register_forward_hook(
            lambda module, args, out, cache=cache: autocast_seen.setdefault(cache, set()).add(
                (torch.is_autocast_enabled("cpu"), out.logits.dtype)))
        runs[cache] = distill_explicit(Phase(student=student, teachers=[teacher], tokenizer=tiny_tokenizer,
                                             data=tokenize_splits(ragged_bundle(), tiny_tokenizer, 16), spec=spec,
                                             distill=DistillConfig(cache_teacher=cache),
                                             train=tiny_train(max_steps=2, batch_size=8, mixed_precision="bf16"),
                                             task="classification"))
    assert autocast_seen == {"off": {(True, torch.bfloat16)}, "auto": {(True, torch.bfloat16)}}
    for key in ("kd", "ce", "hidden_mse", "loss"):  # the first step, from the same weights
        assert runs["auto"].steps[0][key] == pytest.approx(runs["off"].steps[0][key], rel=1e-2), key


def test_an_attention_term_or_a_cache_over_the_limit_runs_the_teacher_every_step(monkeypatch, caplog,
                                                                                  tiny_tokenizer):
    caplog.set_level(logging.INFO, logger="kdistill.strategies.explicit")
    _, _, calls = train_run(tiny_tokenizer, "auto", {"attention_mse": 1.0}, max_steps=2)
    assert calls.count("teacher") == 2
    assert "teacher cache: off: the loss terms ['attention_mse'] need the teacher's attention maps" in caplog.text

    caplog.clear()
    monkeypatch.setattr(explicit, "FEATURE_CACHE_MAX_BYTES", 1000)
    _, _, calls = train_run(tiny_tokenizer, "auto", max_steps=2)
    assert calls.count("teacher") == 2
    assert "teacher cache: hidden states of teacher layers [2, 4] for 48 examples" in caplog.text
    assert "teacher cache: off: the hidden states would exceed the limit (FEATURE_CACHE_MAX_BYTES)" in caplog.text


def test_cls_pkd_with_left_padding_is_not_cached():
    spec = TermSpec({"kd": 1.0, "cls_pkd": 1.0}, pairs=[(1, 2)])
    assert spec.teacher_hidden_layers == ([2], True)
    assert why_not_cached(spec, SimpleNamespace(padding_side="right")) is None
    assert "cls_pkd reads position 0" in why_not_cached(spec, SimpleNamespace(padding_side="left"))


def test_cache_on_with_an_attention_term_is_an_error_naming_the_key(tiny_tokenizer):
    with pytest.raises(ValueError, match=r"cache_teacher: on, but \['minilm_qq'\] need the teacher's attention"):
        DistillConfig(cache_teacher="on", losses={"kd": 1.0, "minilm_qq": 1.0})
    teacher, student, spec = tiny_pair(tiny_tokenizer)  # the loop checks the terms it is given too
    spec.weights["attention_kl"] = 1.0
    with pytest.raises(UserError, match="distill.cache_teacher: on, but the loss terms"):
        distill_explicit(Phase(student=student, teachers=[teacher], tokenizer=tiny_tokenizer,
                               data=toy_encoded(tiny_tokenizer), spec=spec, distill=DistillConfig(cache_teacher="on"),
                               train=tiny_train(), task="classification"))


# ------------------------------------------------------------------------------- logits stored across runs


def test_a_teacher_that_gives_logits_alone_runs_once_for_every_later_run_over_the_same_rows(
        own_teacher_logits_store, caplog, tiny_tokenizer):
    caplog.set_level(logging.INFO, logger="kdistill.strategies.explicit")
    logits_only = {"hidden_mse": 0.0}
    first, first_student, first_calls = train_run(tiny_tokenizer, "auto", logits_only, max_steps=3)
    again, again_student, again_calls = train_run(tiny_tokenizer, "auto", logits_only, max_steps=3)
    assert first_calls[0] == "teacher" and again_calls.count("teacher") == 0
    assert f"the logits of 1 read from {own_teacher_logits_store}" in caplog.text
    assert again.steps == first.steps  # the very floats the first run's teacher computed
    for a, b in zip(first_student.parameters(), again_student.parameters()):
        assert torch.equal(a, b)
    # another row set (one text less) or other teacher weights: the teacher runs again
    caplog.clear()
    teacher, student, spec = tiny_pair(tiny_tokenizer)
    spec.weights.update(logits_only)
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append("teacher"))
    encoded = tokenize_splits(ragged_bundle(), tiny_tokenizer, 16)
    encoded["train"] = encoded["train"].select(range(len(encoded["train"]) - 1))
    distill_explicit(Phase(student=student, teachers=[teacher], tokenizer=tiny_tokenizer, data=encoded, spec=spec,
                           distill=DistillConfig(), train=tiny_train(max_steps=1), task="classification"))
    assert calls and "read from" not in caplog.text
    teacher, student, spec = tiny_pair(tiny_tokenizer)
    spec.weights.update(logits_only)
    with torch.no_grad():
        teacher.classifier.bias.add_(1e-3)
    calls.clear()
    teacher.register_forward_hook(lambda *_: calls.append("teacher"))
    distill_explicit(Phase(student=student, teachers=[teacher], tokenizer=tiny_tokenizer,
                           data=tokenize_splits(ragged_bundle(), tiny_tokenizer, 16), spec=spec,
                           distill=DistillConfig(), train=tiny_train(max_steps=1), task="classification"))
    assert calls and "read from" not in caplog.text


def test_hidden_terms_store_no_logits_and_an_unreadable_store_is_computed_again(own_teacher_logits_store, caplog,
                                                                                tmp_path, tiny_tokenizer):
    train_run(tiny_tokenizer, "auto", max_steps=1)  # kd + ce + hidden_mse: the teacher's hidden states are read
    assert not list(own_teacher_logits_store.iterdir())
    teacher, _, _ = tiny_pair(tiny_tokenizer)
    encoded = tokenize_splits(ragged_bundle(), tiny_tokenizer, 16)["train"]
    key = logits_key(teacher, encoded, autocast="no")
    write_teacher_logits(tmp_path, key, torch.arange(6.0).reshape(3, 2))
    torch.testing.assert_close(read_teacher_logits(tmp_path, key), torch.arange(6.0).reshape(3, 2), rtol=0, atol=0)
    assert read_teacher_logits(tmp_path, {**key, "autocast": "bf16"}) is None
    stored = next(tmp_path.glob("logits-*.safetensors"))
    stored.write_bytes(b"not safetensors")
    caplog.set_level(logging.WARNING, logger="kdistill.cache")
    assert read_teacher_logits(tmp_path, key) is None
    assert "unreadable" in caplog.text and stored.name in caplog.text
