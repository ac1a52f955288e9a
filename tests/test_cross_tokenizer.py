"""A student over another vocabulary than its teacher's (student.model): each model reads its own tokenization.

Two tiny BERTs over two different WordPiece vocabs: the teacher's holds every toy word whole, the student's only
letters, so the student reads each word in pieces and no position of one tokenization matches the other's.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BertForSequenceClassification, BertModel

from kdistill import losses
from kdistill.config import DistillConfig
from kdistill.data import tokenize_splits
from kdistill.distill.explicit import distill_explicit
from kdistill.errors import UserError
from kdistill.models import load_model_dir
from kdistill.pipeline import make_student, preflight, run
from kdistill.terms import TermSpec
from kdistill.tokenization import SPECIAL_TOKENS, tokenizer_from_vocab
from tests.conftest import tiny_bert_config
from tests.helpers import save_teacher_dir, tiny_train, toy_bundle, toy_run_config

NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.fixture(scope="module")
def letter_tokenizer(tmp_path_factory):
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = tmp_path_factory.mktemp("letters") / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL_TOKENS + [f"##{c}" for c in letters] + list(letters)), encoding="utf-8")
    return tokenizer_from_vocab(vocab, model_max_length=64)


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, letter_tokenizer):
    """A 2-layer, 16-wide encoder over the letters, without a classification head (as a sentence encoder is)."""
    torch.manual_seed(1)
    config = tiny_bert_config(letter_tokenizer, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=32)
    path = tmp_path_factory.mktemp("student")
    BertModel(config).save_pretrained(path)
    letter_tokenizer.save_pretrained(path)
    return path


def test_the_first_step_compares_each_model_on_its_own_tokenization(tiny_tokenizer, letter_tokenizer):
    """kd and cls_pkd of step 1, by hand: each model over its own tokenization of the same 16 examples."""
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_bert_config(tiny_tokenizer, **NO_DROPOUT))
    student = BertForSequenceClassification(tiny_bert_config(letter_tokenizer, num_hidden_layers=2, hidden_size=16,
                                                             num_attention_heads=2, **NO_DROPOUT))
    with torch.no_grad():  # logits far from uniform: a KL well above rounding
        teacher.classifier.weight.mul_(100)
    spec = TermSpec({"kd": 1.0, "cls_pkd": 1.0}, pairs=[(1, 2), (2, 4)])
    spec.add_projections(16, 32)
    data = toy_bundle(n_train=16)
    texts = list(data.splits["train"]["text"])
    with torch.no_grad():  # the step's one batch is every example
        t_out, s_out = (model.eval()(**tok(texts, padding=True, truncation=True, max_length=48, return_tensors="pt"),
                                     output_hidden_states=True)
                        for model, tok in ((teacher, tiny_tokenizer), (student, letter_tokenizer)))
        temperature = 2.0
        p_t = torch.softmax(t_out.logits / temperature, -1)
        kl = (p_t * (p_t.log() - torch.log_softmax(s_out.logits / temperature, -1))).sum(-1)
        kd = (temperature**2 * kl).mean().item()
        pkd = sum(losses.cls_pkd(s_out.hidden_states[s][:, 0], t_out.hidden_states[t][:, 0],
                                 projection=spec.projections["hidden"])[0] for s, t in spec.pairs) / (2 * len(texts))
    assert letter_tokenizer(texts[0])["input_ids"] != tiny_tokenizer(texts[0])["input_ids"]

    encoded = tokenize_splits(data, letter_tokenizer, 48)
    history = distill_explicit(student.train(), [teacher], letter_tokenizer, encoded, spec=spec, distill=DistillConfig(losses=spec.weights, temperature=temperature),
                               train=tiny_train(max_steps=1, batch_size=16), teacher_tokenizer=tiny_tokenizer,
                               teacher_train=tokenize_splits(data, tiny_tokenizer, 48, ("train",))["train"])
    assert kd > 0.1 and pkd > 0.1
    assert history.steps[0]["kd"] == pytest.approx(kd, rel=1e-4)
    assert history.steps[0]["cls_pkd"] == pytest.approx(pkd.item(), rel=1e-3)  # the cache holds fp16


def cross_config(tmp_path, teacher_dir, student_model, strategy="explicit", **distill):
    cfg = toy_run_config(tmp_path, teacher_dir, strategy, **distill)
    return cfg.model_copy(update={"student": cfg.student.model_copy(update={"model": str(student_model)})})


def test_a_run_with_a_student_over_another_vocabulary(tmp_path, tiny_tokenizer, letter_tokenizer, student_dir):
    teacher_dir = save_teacher_dir(tmp_path / "teacher", tiny_tokenizer)
    # cls_pkd: one pooled vector per example, through a learned 16 -> 32 projection
    cfg = cross_config(tmp_path, teacher_dir, student_dir, losses={"kd": 1.0, "ce": 0.1, "cls_pkd": 1.0},
                       baseline=True)
    run_dir = run(cfg, tmp_path / "run")

    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    models = metrics["models"]
    assert set(models) == {"teacher", "student", "baseline"}
    for r in models.values():
        assert 0.0 <= r["accuracy"] <= 1.0
    # each model was evaluated on its own tokenization: the letters make more tokens of the same texts
    assert models["student"]["mean_tokens_per_example"] > models["teacher"]["mean_tokens_per_example"]
    assert models["baseline"]["mean_tokens_per_example"] == models["student"]["mean_tokens_per_example"]
    history = json.loads((run_dir / "logs" / "history_student.json").read_text(encoding="utf-8"))
    assert {"kd", "ce", "cls_pkd"} <= set(history["steps"][0])
    teacher = load_model_dir(teacher_dir)[0]
    for name in ("student", "baseline"):
        model, tokenizer, _ = load_model_dir(run_dir / name)
        assert tokenizer.get_vocab() == letter_tokenizer.get_vocab()
        assert model.config.hidden_size == 16 and model.config.id2label == teacher.config.id2label
    assert (run_dir / "report.md").is_file()


@pytest.mark.parametrize("term", ["hidden_mse", "attention_kl", "minilm_qq", "embedding_mse"])
def test_position_by_position_terms_are_refused_before_anything_runs(tmp_path, tiny_tokenizer, term):
    teacher_dir = save_teacher_dir(tmp_path / "teacher", tiny_tokenizer)
    # a built-in alias: its tokenizer and config are read, its weights are not
    cfg = cross_config(tmp_path, teacher_dir, "minilm-l6", losses={"kd": 1.0, term: 1.0})
    with pytest.raises(UserError) as e:
        preflight(cfg, tmp_path / "run")
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"distill.losses: ['{term}']")
    assert "do not align" in message and "kd, ce" in message
    assert not (tmp_path / "run").exists()


def test_a_run_over_another_vocabulary_needs_the_teacher_cache(tmp_path, tiny_tokenizer, student_dir):
    teacher_dir = save_teacher_dir(tmp_path / "teacher", tiny_tokenizer)
    for setting, expected in (({"cache_teacher": "off"}, "distill.cache_teacher: off"),
                              ({"strategy": "mutual"}, "distill.strategy: mutual")):
        cfg = cross_config(tmp_path, teacher_dir, student_dir, losses={"kd": 1.0}, **setting)
        with pytest.raises(UserError, match=expected):
            preflight(cfg, tmp_path / "run")


def test_a_student_over_the_same_vocabulary_is_not_refused(tmp_path, tiny_tokenizer, teacher_dir):
    cfg = cross_config(tmp_path, teacher_dir, teacher_dir, losses={"kd": 1.0, "hidden_mse": 1.0})
    preflight(cfg, tmp_path / "run")


def test_a_student_head_for_other_labels_is_refused(tmp_path, tiny_bert_dir, teacher_dir):
    cfg = cross_config(tmp_path, teacher_dir, tiny_bert_dir, losses={"kd": 1.0})
    with pytest.raises(UserError, match=r"student.model: .* was trained on labels \['sport', 'tech', 'politics'\], "
                                        r"the data has \['politics', 'sport', 'tech'\]; give an encoder"):
        make_student(cfg, load_model_dir(teacher_dir)[0], None)
