"""A student over another vocabulary than its teacher's (student.model): each model reads its own tokenization.

Two tiny BERTs over two different WordPiece vocabs: the teacher's holds every toy word whole, the student's only
letters, so the student reads each word in pieces and no position of one tokenization matches the other's.

Then the building blocks of distillation between causal LMs over different vocabularies: ULD, the
shared-vocabulary KD, and the pairing of positions (character offsets) and tokens (bytes) in kdistill/tokenalign.py.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers import models as tk_models
from transformers import BertForSequenceClassification, BertModel, PreTrainedTokenizerFast

from kdistill import losses
from kdistill.config import DistillConfig
from kdistill.data import tokenize_splits
from kdistill.strategies.explicit import distill_explicit
from kdistill.errors import UserError
from kdistill.models import load_model_dir
from kdistill.pipeline import make_student, preflight, run
from kdistill.terms import TermSpec
from kdistill.tokenalign import (aligned_positions, aligned_positions_batch, shared_vocab, token_byte_lengths,
                                token_bytes, tokenizer_scheme)
from kdistill.tokenization import SPECIAL_TOKENS, tokenizer_from_vocab
from tests.conftest import tiny_bert_config
from tests.helpers import save_teacher_dir, tiny_train, toy_bundle, toy_run_config
from kdistill.strategies.phase import Phase

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
    history = distill_explicit(Phase(student=student.train(), teachers=[teacher], tokenizer=letter_tokenizer,
                                     data=encoded, spec=spec,
                                     distill=DistillConfig(losses=spec.weights, temperature=temperature),
                                     train=tiny_train(max_steps=1, batch_size=16), task="classification"),
                               teacher_tokenizer=tiny_tokenizer,
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


def test_a_pretrained_student_with_student_layers_is_pruned_from_its_own_weights(tmp_path, tiny_tokenizer,
                                                                                  student_dir):
    """student.model with student.layers: layers of that model (not the teacher's), a new head for the labels."""
    teacher_dir = save_teacher_dir(tmp_path / "teacher", tiny_tokenizer)
    teacher = load_model_dir(teacher_dir)[0]
    cfg = cross_config(tmp_path, teacher_dir, student_dir, losses={"kd": 1.0})
    whole, copied = make_student(cfg, teacher, None)
    assert whole.config.num_hidden_layers == 2 and copied is None  # no shape key: the model as it is

    cfg = cfg.model_copy(update={"student": cfg.student.model_copy(update={"layers": [1], "init": "teacher-layers"})})
    sliced, copied = make_student(cfg, teacher, None)
    pretrained = BertModel.from_pretrained(student_dir)
    assert sliced.config.num_hidden_layers == 1 and copied is None  # not the teacher's layers: no `init` pairs
    assert sliced.kdistill_init["source"] == str(student_dir)  # the report names the model it was cut from
    assert sliced.config.id2label == teacher.config.id2label
    for name, value in pretrained.encoder.layer[1].state_dict().items():
        assert torch.equal(sliced.bert.encoder.layer[0].state_dict()[name], value), name
    assert torch.equal(sliced.bert.embeddings.word_embeddings.weight, pretrained.embeddings.word_embeddings.weight)


def test_a_student_head_for_other_labels_is_refused(tmp_path, tiny_bert_dir, teacher_dir):
    cfg = cross_config(tmp_path, teacher_dir, tiny_bert_dir, losses={"kd": 1.0})
    with pytest.raises(UserError, match=r"student.model: .* was trained on labels \['sport', 'tech', 'politics'\], "
                                        r"the data has \['politics', 'sport', 'tech'\]; give an encoder"):
        make_student(cfg, load_model_dir(teacher_dir)[0], None)


# ----------------------------------------------------------------------------------------------------------
# Causal LMs over different vocabularies: the pure building blocks, ULD and the shared-vocabulary KD
# (losses.uld_loss, losses.aligned_kd_loss) and the pairing of positions and tokens (kdistill/tokenalign.py).
# Tolerances: float32 sums of a few dozen probabilities, each rounded at ~6e-8 relative.
# ----------------------------------------------------------------------------------------------------------

ATOL = 1e-6


def _logits(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2


def _uld_reference(student_logits, teacher_probs, temperature=1.0):
    """The paper's implementation, written out: sort both, pad the shorter with zeros, sum |difference| per row."""
    s = torch.softmax(student_logits.double() / temperature, -1).sort(-1, descending=True).values
    t = teacher_probs.double().sort(-1, descending=True).values
    width = max(s.shape[-1], t.shape[-1])
    s = torch.nn.functional.pad(s, (0, width - s.shape[-1]))
    t = torch.nn.functional.pad(t, (0, width - t.shape[-1]))
    return (s - t).abs().sum(-1)


def test_uld_is_zero_for_the_same_distribution_in_any_vocabulary_order():
    z = _logits(4, 6, seed=1)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    total, count = losses.uld_loss(z, z[:, perm], temperature=2.0)
    assert total.dim() == 0 and abs(total.item()) < ATOL and int(count) == 4
    assert losses.uld_loss(_logits(4, 6, seed=2), z, temperature=2.0)[0].item() > 0.1


def test_uld_ignores_zero_probability_entries_on_either_side():
    student, teacher = _logits(3, 5, seed=1), _logits(3, 7, seed=2)
    never = torch.full((3, 4), float("-inf"))  # tokens with probability 0
    plain = losses.uld_loss(student, teacher, temperature=1.5)[0]
    assert plain.item() > 0.1
    for s, t in ((student, torch.cat([teacher, never], -1)), (torch.cat([never, student], -1), teacher),
                 (torch.cat([student, never, never], -1), teacher)):  # the student now the longer side
        assert losses.uld_loss(s, t, temperature=1.5)[0].item() == pytest.approx(plain.item(), abs=ATOL)


def test_uld_matches_a_hand_computed_value():
    p_s = torch.tensor([[0.5, 0.3, 0.2]])
    # teacher [0.1, 0.6, 0.3] sorted is [0.6, 0.3, 0.1]: |0.5 − 0.6| + |0.3 − 0.3| + |0.2 − 0.1| = 0.2
    assert losses.uld_loss(p_s.log(), torch.tensor([[0.1, 0.6, 0.3]]).log())[0].item() == pytest.approx(0.2, abs=ATOL)
    # a 2-token teacher [0.7, 0.3] is padded with a zero: |0.5 − 0.7| + 0 + |0.2 − 0| = 0.4
    assert losses.uld_loss(p_s.log(), torch.tensor([[0.3, 0.7]]).log())[0].item() == pytest.approx(0.4, abs=ATOL)
    # a top-2 teacher (log-probs 0.6, 0.3; the other 0.1 of its mass not stored, so zeros): 0.1 + 0 + 0.2 = 0.3
    top2 = torch.tensor([[0.6, 0.3]]).log()
    assert losses.uld_loss(p_s.log(), teacher_topk_logprobs=top2)[0].item() == pytest.approx(0.3, abs=ATOL)


def test_uld_agrees_with_the_reference_at_a_temperature_and_with_a_top_k_teacher():
    student, teacher = _logits(5, 9, seed=3), _logits(5, 13, seed=4)
    expected = _uld_reference(student, torch.softmax(teacher / 2.0, -1), temperature=2.0).sum()
    assert losses.uld_loss(student, teacher, temperature=2.0)[0].item() == pytest.approx(expected.item(), abs=1e-5)
    log_p = torch.log_softmax(teacher, -1)
    # K = Vt: the top-k path is the full teacher at any temperature
    full = losses.uld_loss(student, teacher_topk_logprobs=log_p.sort(-1, descending=True).values, temperature=2.0)
    assert full[0].item() == pytest.approx(expected.item(), abs=1e-5)
    # K < Vt at T = 1: the stored probabilities as they are, the rest of the mass zeros
    top4 = log_p.topk(4, -1).values
    expected_top4 = _uld_reference(student, top4.exp()).sum()
    assert losses.uld_loss(student, teacher_topk_logprobs=top4)[0].item() == pytest.approx(expected_top4.item(),
                                                                                          abs=1e-5)
    # K < Vt at T = 2: the stored mass s shared out as s · softmax(log p / T) over the K entries
    s = top4.exp().sum(-1, keepdim=True)
    expected_t2 = _uld_reference(student, s * torch.softmax(top4 / 2.0, -1), temperature=2.0).sum()
    assert losses.uld_loss(student, teacher_topk_logprobs=top4, temperature=2.0)[0].item() == pytest.approx(
        expected_t2.item(), abs=1e-5)


def test_uld_masked_positions_count_for_nothing_and_get_no_gradient():
    student = _logits(4, 6, seed=1).requires_grad_()
    teacher = _logits(4, 8, seed=2)
    teacher[1] = float("nan")  # a padded position may hold anything
    mask = torch.tensor([True, False, True, True])
    total, count = losses.uld_loss(student, teacher, mask=mask)
    total.backward()
    assert int(count) == 3
    assert total.item() == pytest.approx(_uld_reference(student.detach(), torch.softmax(teacher, -1))[mask].sum()
                                         .item(), abs=1e-5)
    assert torch.isfinite(student.grad).all() and student.grad[1].abs().max().item() == 0.0


@pytest.mark.parametrize("loss", ["uld", "aligned"])
def test_cross_vocabulary_gradients_reach_the_student_and_not_a_detached_teacher(loss):
    student = _logits(4, 6, seed=1).requires_grad_()
    teacher = _logits(4, 8, seed=2).requires_grad_()
    teacher_side = teacher.detach().clone()
    teacher_side[:, -2:] = float("-inf")  # tokens the teacher never predicts keep the gradient finite
    if loss == "uld":
        total, _ = losses.uld_loss(student, teacher_side, temperature=2.0)
    else:
        total, _ = losses.aligned_kd_loss(student, teacher_side, shared=(torch.tensor([0, 6]), torch.tensor([2, 5])),
                                          temperature=2.0)
    total.backward()
    assert teacher.grad is None
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_uld_refuses_unpaired_rows_and_an_ambiguous_teacher():
    with pytest.raises(ValueError, match="pair the positions first"):
        losses.uld_loss(_logits(3, 5, seed=1), _logits(4, 5, seed=2))
    with pytest.raises(ValueError, match="exactly one"):
        losses.uld_loss(_logits(3, 5, seed=1))


# ---------------------------------------------------------------------------------- aligned_kd_loss


def test_aligned_kd_matches_a_hand_computed_value():
    # teacher vocabulary [a, b, c], student [d, b, a]: a and b shared (teacher 0 ↔ student 2, 1 ↔ 1)
    p_t = torch.tensor([[0.5, 0.3, 0.2]])
    p_s = torch.tensor([[0.3, 0.35, 0.35]])
    shared = (torch.tensor([0, 1]), torch.tensor([2, 1]))
    # shared part: q_T = [5/8, 3/8], q_S = [1/2, 1/2]; rest: c (0.2) against d (0.3)
    kl = 5 / 8 * math.log(5 / 4) + 3 / 8 * math.log(3 / 4)
    total, count = losses.aligned_kd_loss(p_s.log(), p_t.log(), shared=shared, uld_weight=0.5)
    assert int(count) == 1
    assert total.item() == pytest.approx(kl + 0.5 * 0.1, abs=ATOL)


def test_aligned_kd_is_zero_when_both_give_the_same_distribution_over_the_shared_vocabulary():
    # teacher [a, b, c, x, y], student [c, z, a, b, u, w]; shared a, b, c
    shared = (torch.tensor([0, 1, 2]), torch.tensor([2, 3, 0]))
    p_t = torch.tensor([[0.2, 0.1, 0.3, 0.25, 0.15]])
    same = torch.tensor([[0.3, 0.25, 0.2, 0.1, 0.15, 0.0]])  # unshared mass 0.25, 0.15 on other tokens, w never
    total, _ = losses.aligned_kd_loss(same.log(), p_t.log(), shared=shared, temperature=1.0)
    assert abs(total.item()) < ATOL
    # the same conditional on the shared tokens but another split of the rest: the KL part stays 0, ULD sees it
    other_rest = torch.tensor([[0.3, 0.35, 0.2, 0.1, 0.05, 0.0]])
    assert losses.aligned_kd_loss(other_rest.log(), p_t.log(), shared=shared)[0].item() == pytest.approx(0.2, abs=ATOL)
    assert abs(losses.aligned_kd_loss(other_rest.log(), p_t.log(), shared=shared, uld_weight=0.0)[0].item()) < ATOL


def test_aligned_kd_with_one_tokenizer_is_the_forward_kl():
    student, teacher = _logits(2, 5, 11, seed=1), _logits(2, 5, 11, seed=2)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    identity = (torch.arange(11), torch.arange(11))
    total, count = losses.aligned_kd_loss(student, teacher, shared=identity, temperature=2.0, mask=mask)
    expected, expected_count = losses.forward_kl_tokens(student, teacher, temperature=2.0, mask=mask)
    assert int(count) == int(expected_count) == 8
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)


def test_aligned_kd_without_shared_tokens_is_uld():
    student, teacher = _logits(3, 6, seed=1), _logits(3, 9, seed=2)
    none = (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    total = losses.aligned_kd_loss(student, teacher, shared=none, temperature=2.0)[0]
    assert total.item() == pytest.approx(losses.uld_loss(student, teacher, temperature=2.0)[0].item(), abs=ATOL)


def test_aligned_kd_with_a_top_k_teacher():
    student, teacher = _logits(4, 7, seed=1), _logits(4, 10, seed=2)
    shared = (torch.tensor([0, 2, 3, 5, 9]), torch.tensor([6, 0, 1, 3, 2]))
    log_p = torch.log_softmax(teacher, -1)
    values, ids = log_p.sort(-1, descending=True)
    full = losses.aligned_kd_loss(student, teacher, shared=shared, temperature=2.0)[0]
    as_topk = losses.aligned_kd_loss(student, shared=shared, teacher_topk=(values, ids), temperature=2.0)[0]
    assert as_topk.item() == pytest.approx(full.item(), rel=1e-5)  # K = Vt: the same loss
    # K = 2 with only unshared entries stored (teacher ids 1 and 4): the shared part adds 0, the rest is ULD of
    # the stored probabilities against the student's unshared tokens (4, 5)
    top = torch.tensor([[1, 4]]).expand(4, 2)
    stored = log_p.gather(-1, top)
    student_rest = torch.softmax(student, -1)[:, [4, 5]]
    expected = (student_rest.sort(-1, descending=True).values - stored.exp().sort(-1, descending=True).values)
    total = losses.aligned_kd_loss(student.requires_grad_(), shared=shared, teacher_topk=(stored, top))[0]
    assert total.item() == pytest.approx(expected.abs().sum().item(), abs=ATOL)
    total.backward()
    assert torch.isfinite(student.grad).all()


def test_aligned_kd_refuses_ids_outside_the_vocabularies():
    with pytest.raises(ValueError, match="shared ids reach past"):
        losses.aligned_kd_loss(_logits(2, 4, seed=1), _logits(2, 5, seed=2),
                               shared=(torch.tensor([1]), torch.tensor([4])))


# ----------------------------------------------------------------------------------------------- positions


def test_alignment_pairs_only_the_common_token_ends():
    text = "unbelievable"
    t, s = aligned_positions(text, [(0, 2), (2, 8), (8, 12)], [(0, 5), (5, 12)])
    assert t.tolist() == [2] and s.tolist() == [1]
    # the same tokenization pairs every position with itself
    words = [(0, 3), (3, 7), (7, 11)]
    t, s = aligned_positions("the cat sat", words, words)
    assert t.tolist() == s.tolist() == [0, 1, 2]


def test_alignment_skips_special_tokens_padding_split_characters_and_a_truncated_end():
    text = "naïve cat"  # ï is one character, two bytes
    # teacher: BOS, "na"+first byte of ï, second byte of ï + "ve" (byte-level BPE gives both parts the whole ï),
    # " cat", then right padding
    teacher = [(0, 0), (0, 3), (2, 5), (5, 9), (0, 0), (0, 0)]
    student = [(0, 3), (3, 5), (5, 9)]  # "naï", "ve", " cat"
    t, s = aligned_positions(text, teacher, student)
    assert t.tolist() == [2, 3] and s.tolist() == [1, 2]  # not at 3: the teacher had read half of ï there
    # truncated after "naï": its last token might end inside a character, so it pairs with nothing
    t, s = aligned_positions(text, teacher[:2], student)
    assert t.tolist() == s.tolist() == []
    with pytest.raises(ValueError, match="past the text"):
        aligned_positions("short", [(0, 9)], [(0, 5)])


def test_alignment_of_a_batch_gives_row_indices():
    texts = ["unbelievable", "the cat"]
    teacher = torch.tensor([[[0, 2], [2, 8], [8, 12]], [[0, 3], [3, 7], [0, 0]]])  # (B, Lt, 2), row 1 padded
    student = torch.tensor([[[0, 0], [0, 5], [5, 12]], [[0, 0], [0, 3], [3, 7]]])  # (B, Ls, 2), BOS first
    rows, t, s = aligned_positions_batch(texts, teacher, student)
    assert rows.tolist() == [0, 1, 1] and t.tolist() == [2, 0, 1] and s.tolist() == [2, 1, 2]


@pytest.fixture(scope="module")
def unigram_tokenizer(docs):
    """A SentencePiece-style Unigram ('▁' for spaces) trained on the toy corpus and the odd texts below."""
    tok = Tokenizer(tk_models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(docs + ODD_TEXTS, trainers.UnigramTrainer(vocab_size=150, special_tokens=["<unk>"],
                                                                      unk_token="<unk>"))
    return tok


ODD_TEXTS = ["A naïve café charges €5 for tea.", "Two  spaces\nand a new line; the unbelievable end."]


def _prefix_pairs(text, decode_t, ids_t, decode_s, ids_s):
    """Reference: the positions whose decoded prefixes are the same non-empty prefix of the text (the last of equal
    ones), found by decoding, without offsets."""
    def read(decode, ids):
        prefixes = {}
        for i in range(len(ids)):
            prefix = decode(ids[: i + 1])
            if prefix and text.startswith(prefix):
                prefixes[prefix] = i
        return prefixes
    t, s = read(decode_t, ids_t), read(decode_s, ids_s)
    return sorted((t[p], s[p]) for p in t.keys() & s.keys())


def test_alignment_of_two_real_tokenizers_pairs_exactly_the_equal_prefixes(bpe_tokenizer, unigram_tokenizer, docs):
    paired = 0
    for text in docs[:10] + ODD_TEXTS:
        teacher = bpe_tokenizer(text, return_offsets_mapping=True)
        student = unigram_tokenizer.encode(text)
        t, s = aligned_positions(text, teacher["offset_mapping"], student.offsets)
        expected = _prefix_pairs(text, bpe_tokenizer.decode, teacher["input_ids"], unigram_tokenizer.decode,
                                 student.ids)
        assert list(zip(t.tolist(), s.tolist())) == expected, text
        assert teacher["input_ids"] != student.ids
        paired += len(expected)
    assert paired > 50


def test_alignment_of_byte_level_bpe_and_wordpiece(bpe_tokenizer, tiny_tokenizer):
    text = "the team says"
    teacher = bpe_tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
    student = tiny_tokenizer(text, return_offsets_mapping=True)  # [CLS] the team says [SEP]
    t, s = aligned_positions(text, teacher, student["offset_mapping"])
    ends = [teacher[i][1] for i in t.tolist()]
    assert ends == [3, 8, 13]  # every word end, whatever pieces the BPE made
    assert tiny_tokenizer.convert_ids_to_tokens([student["input_ids"][i] for i in s.tolist()]) == ["the", "team",
                                                                                                   "says"]


# ---------------------------------------------------------------------------------------------- vocabulary


@pytest.fixture(scope="module")
def hand_vocabs():
    """A byte-level BPE and a Llama-style SentencePiece BPE (byte fallback), over hand-written vocabularies."""
    byte_level = Tokenizer(tk_models.BPE(vocab={"Ġthe": 0, "the": 1, "Ċ": 2, "Ġ": 3, "x": 4, "A": 5}, merges=[]))
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte_level.decoder = decoders.ByteLevel()
    byte_level.add_special_tokens(["<|endoftext|>"])
    piece = Tokenizer(tk_models.BPE(vocab={"<unk>": 0, "▁the": 1, "the": 2, "<0x0A>": 3, "▁": 4, "<0x41>": 5,
                                           "A": 6, "y": 7, "<0x78>": 8}, merges=[], byte_fallback=True,
                                    unk_token="<unk>"))
    piece.pre_tokenizer = pre_tokenizers.Metaspace()
    piece.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                       decoders.Strip(" ", 1, 0)])
    piece.add_special_tokens(["<unk>"])
    return byte_level, piece


def test_shared_vocab_matches_tokens_by_the_bytes_they_stand_for(hand_vocabs):
    byte_level, piece = hand_vocabs
    assert tokenizer_scheme(byte_level) == "byte-level" and tokenizer_scheme(piece) == "sentencepiece"
    teacher_ids, student_ids = shared_vocab(byte_level, piece)
    pairs = {(byte_level.id_to_token(t), piece.id_to_token(s)) for t, s in zip(teacher_ids.tolist(),
                                                                               student_ids.tolist())}
    # 'A' pairs with the piece 'A', not with its byte-fallback twin <0x41>; 'x' only has a byte piece there;
    # the special tokens pair with nothing
    assert pairs == {("Ġthe", "▁the"), ("the", "the"), ("Ċ", "<0x0A>"), ("Ġ", "▁"), ("A", "A"), ("x", "<0x78>")}
    assert teacher_ids.dtype == student_ids.dtype == torch.long
    assert teacher_ids.tolist() == sorted(teacher_ids.tolist())
    # the other way round, through a transformers wrapper: the same pairs, swapped
    back_t, back_s = shared_vocab(PreTrainedTokenizerFast(tokenizer_object=piece), byte_level)
    assert sorted(zip(back_s.tolist(), back_t.tolist())) == sorted(zip(teacher_ids.tolist(), student_ids.tolist()))


def test_token_bytes_per_scheme(tiny_tokenizer):
    assert token_bytes("ĠnaÃ¯ve", "byte-level") == " naïve".encode()
    assert token_bytes("▁naïve", "sentencepiece") == " naïve".encode() and token_bytes("<0xE2>", "sentencepiece") \
        == b"\xe2"
    assert token_bytes("▁x", "byte-level") is None  # '▁' is no byte-level character
    assert tokenizer_scheme(tiny_tokenizer) == "plain" and token_bytes("##ing", "plain") == b"##ing"


def test_shared_vocab_of_one_tokenizer_is_the_identity_without_specials(bpe_tokenizer):
    teacher_ids, student_ids = shared_vocab(bpe_tokenizer, bpe_tokenizer)
    assert torch.equal(teacher_ids, student_ids)
    assert set(teacher_ids.tolist()) == set(range(len(bpe_tokenizer))) - {bpe_tokenizer.eos_token_id}


def test_token_byte_lengths_count_the_text_each_id_decodes_to(bpe_tokenizer):
    lengths = token_byte_lengths(bpe_tokenizer)
    assert lengths.shape == (len(bpe_tokenizer),)
    eos = bpe_tokenizer.eos_token_id
    assert lengths[eos] == 0  # a special token stands for no text
    checked = 0
    for i in range(len(bpe_tokenizer)):
        text = bpe_tokenizer.decode([i])
        if i != eos and "\ufffd" not in text:  # a lone byte of a multi-byte character decodes to U+FFFD
            assert lengths[i] == len(text.encode("utf-8")), bpe_tokenizer.convert_ids_to_tokens(i)
            checked += 1
    assert checked > 150  # the ASCII bytes and the merges
    lone = bpe_tokenizer.convert_tokens_to_ids("Ã")  # byte 0xC3 alone
    assert lengths[lone] == 1


@pytest.mark.parametrize("loss", ["uld", "aligned"])
def test_cross_vocabulary_losses_of_no_position_are_zero(loss):
    """A micro-batch may hold no aligned target (its pieces are one token long): (0, 0), and a gradient of 0."""
    student = torch.zeros(0, 7, requires_grad=True)
    topk = (torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.long))
    if loss == "uld":
        total, count = losses.uld_loss(student, teacher_topk_logprobs=topk[0])
    else:
        total, count = losses.aligned_kd_loss(student, shared=(torch.arange(4), torch.arange(4)), teacher_topk=topk)
    total.backward()
    assert float(total) == 0 and int(count) == 0 and student.grad.shape == (0, 7)
