"""Causal-LM distillation across tokenizers: a byte-level BPE teacher, a SentencePiece-style student, end to end
(text pieces, the teacher signal with byte ends, aligned targets, uld / aligned_kd), and the refusals."""

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
from tokenizers import models as tk_models
from transformers import PreTrainedTokenizerFast

from kdistill import cli
from kdistill.cache import build_topk_cache, open_teacher_signal
from kdistill.config import load_config
from kdistill.data import encode_blocks, next_token_targets, text_blocks
from kdistill.strategies.causal import with_alignment, with_targets
from kdistill.errors import UserError
from kdistill.features import Features
from kdistill.models import load_model_dir
from kdistill.pipeline import preflight, run
from kdistill.terms import CrossTeacher, TermSpec, compute_terms
from kdistill.tokenalign import pairs_of_ends, shared_vocab
from tests.conftest import tiny_gpt2
from tests.helpers import assert_halves_match_one_batch, finish, history, start_kdistill, write_lm_recipe


@pytest.fixture(scope="module")
def sp_tokenizer(docs):
    """A SentencePiece-style Unigram ('▁' for spaces), as a fast tokenizer with EOS </s>."""
    tok = Tokenizer(tk_models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(docs, trainers.UnigramTrainer(vocab_size=150, special_tokens=["<unk>", "</s>"],
                                                          unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="</s>",
                                   model_max_length=64)


def cross_recipe(tmp_path, bpe_tokenizer, sp_tokenizer, docs, losses, **train):
    student_dir = tmp_path / "student-init"
    tiny_gpt2(sp_tokenizer, layers=2, seed=1).save_pretrained(student_dir)
    sp_tokenizer.save_pretrained(student_dir)
    return write_lm_recipe(
        tmp_path, tiny_gpt2(bpe_tokenizer), bpe_tokenizer, docs, name="cross", block_size=16,
        student={"model": str(student_dir)}, distill={"losses": losses, "temperature": 2.0, "cache_top_k": 8},
        train={"max_steps": 2, "batch_size": 4, "lr": 1e-3, **train},
        eval={"repeats": 1, "warmup": 0, "throughput_batch_size": 2})


def test_both_tokenizers_read_the_same_text_pieces(bpe_tokenizer, sp_tokenizer, docs):
    pieces = text_blocks(docs[:6], sp_tokenizer, 16)
    student, teacher = encode_blocks(pieces, sp_tokenizer, 16), encode_blocks(pieces, bpe_tokenizer)
    assert student.input_ids.shape[1] == 16 and student.texts == teacher.texts == pieces
    for b, piece in enumerate(pieces):
        assert piece in " ".join(docs[:6]) and piece == piece.strip()
        for blocks, tok in ((student, sp_tokenizer), (teacher, bpe_tokenizer)):
            ids = blocks.input_ids[b][blocks.attention_mask[b].bool()].tolist()
            # a boundary's byte end is where the decoded prefix ends in the piece
            for i in (blocks.ends[b] >= 0).nonzero().flatten().tolist():
                prefix = tok.decode(ids[: i + 1]).strip()
                assert piece.encode()[: int(blocks.ends[b, i])].decode().strip() == prefix
    rows, t_pos, s_pos = pairs_of_ends(teacher.ends, student.ends)
    assert len(rows) > len(pieces)  # every word end is a boundary of both
    assert torch.equal(teacher.ends[rows, t_pos], student.ends[rows, s_pos])


def test_same_tokenizer_aligned_terms_reduce_to_the_top_k_forward_kl():
    torch.manual_seed(0)
    batch, length, vocab, k = 3, 7, 11, 4
    student_logits = torch.randn(batch, length, vocab)
    teacher_logprobs, teacher_ids = torch.randn(batch, length, vocab).log_softmax(-1).topk(k, dim=-1)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[2, 5:] = 0
    ends = torch.arange(length).repeat(batch, 1) * 3 + 2  # one tokenization: every token ends where its twin does
    ends[mask == 0] = -1
    ends[1, 3] = -1  # a token inside a character on both sides
    labels, valid = next_token_targets(torch.zeros_like(mask), mask)
    aligned = with_alignment({"teacher_ends": ends, "ends": ends, "valid": valid})["aligned"]
    rows, t_pos, s_pos = aligned
    assert torch.equal(t_pos, s_pos)
    cross = CrossTeacher(rows, s_pos, teacher_logprobs[rows, t_pos], teacher_ids[rows, t_pos])
    identity = (torch.arange(vocab), torch.arange(vocab))
    spec = TermSpec({"aligned_kd": 1.0}, [], shared_vocab=identity)
    student = Features(logits=student_logits, attention_mask=mask)
    got_sum, got_count = compute_terms(spec, student, None, labels, temperature=2.0, task="causal-lm", valid=valid,
                                       cross=cross)["aligned_kd"]
    counted = valid.clone()
    counted[1, 3] = False
    want_sum, want_count = compute_terms(TermSpec({"forward_kl": 1.0}, []), student, None, labels, temperature=2.0,
                                         task="causal-lm", valid=counted,
                                         teacher_topk=(teacher_logprobs, teacher_ids))["forward_kl"]
    assert int(got_count) == int(want_count) == int(counted.sum())
    torch.testing.assert_close(got_sum, want_sum, rtol=1e-5, atol=1e-6)  # float32 sums of the same terms


@pytest.mark.parametrize("term", ["aligned_kd", "uld"])
def test_a_student_over_another_tokenizer_learns_from_the_teacher_signal(tmp_path, bpe_tokenizer, sp_tokenizer, docs,
                                                                         term):
    cfg = load_config(cross_recipe(tmp_path, bpe_tokenizer, sp_tokenizer, docs, {term: 1.0, "lm": 0.5}))
    run_dir = run(cfg, tmp_path / "run")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    cross = metrics["cross_tokenizer"]
    assert cross["terms"] == [term] and 0.3 < cross["aligned_fraction"] <= 1
    assert cross["shared_vocab"] > 0 if term == "aligned_kd" else cross["shared_vocab"] is None
    signal = open_teacher_signal(metrics["teacher_cache"]["path"])
    assert signal.has_ends and signal.k == 8
    for name in ("teacher", "student", "baseline"):
        assert metrics["models"][name]["bits_per_byte"] > 0
    # the teacher is scored on its own tokens of the same test pieces, the students on theirs
    assert metrics["models"]["teacher"]["n_test_tokens"] != metrics["models"]["student"]["n_test_tokens"]
    _, saved_tokenizer, _ = load_model_dir(run_dir / "student", task="causal-lm")
    assert saved_tokenizer.get_vocab() == sp_tokenizer.get_vocab()
    steps = history(run_dir, "student")["steps"]
    assert len(steps) == 2 and all(s[term] > 0 for s in steps)


def test_a_student_over_another_tokenizer_without_a_method_is_refused_before_anything_runs(
        tmp_path, bpe_tokenizer, sp_tokenizer, docs):
    cfg = load_config(cross_recipe(tmp_path, bpe_tokenizer, sp_tokenizer, docs, {"forward_kl": 1.0, "lm": 0.5}))
    with pytest.raises(UserError, match="another tokenizer than the teacher.*uld or aligned_kd"):
        preflight(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("term", ["aligned_kd", "uld"])
def test_gradient_accumulation_gives_the_aligned_terms_of_one_big_batch(tmp_path, bpe_tokenizer, sp_tokenizer, docs,
                                                                         term):
    """Two micro-batches with different shares of aligned targets give the loss and gradients of one batch (unit
    "aligned": each term is divided by the aligned targets of the whole step)."""
    # a piece of rare words (split into characters, bytes of ï, é, €) aligns in another share of its targets
    pieces = ["A naïve café charges €5 for unbelievable tea.", *text_blocks(docs[:8], sp_tokenizer, 16)[:3]]
    student_blocks, teacher_blocks = encode_blocks(pieces, sp_tokenizer, 16), encode_blocks(pieces, bpe_tokenizer)
    teacher = tiny_gpt2(bpe_tokenizer, seed=1).double()
    signal = build_topk_cache(teacher, teacher_blocks.input_ids, teacher_blocks.attention_mask, k=8, root=tmp_path,
                              ends=teacher_blocks.ends)
    big = with_alignment(with_targets({**student_blocks.batch(slice(0, 4)), "idx": torch.arange(4),
                                       "ends": student_blocks.ends, "teacher_ends": signal.ends(range(4))}))
    halves = [with_alignment(with_targets({k: v[rows] for k, v in big.items() if k not in ("aligned", "labels",
                                                                                        "valid")}))
              for rows in (slice(0, 1), slice(1, 4))]
    aligned_share = [h["aligned"].shape[1] / int(h["valid"].sum()) for h in halves]
    assert abs(aligned_share[0] - aligned_share[1]) > 0.2 * max(aligned_share)  # else "targets" would pass too
    assert sum(h["aligned"].shape[1] for h in halves) == big["aligned"].shape[1]
    spec = TermSpec({term: 1.0, "lm": 0.3}, [], shared_vocab=shared_vocab(bpe_tokenizer, sp_tokenizer))
    assert_halves_match_one_batch(lambda: tiny_gpt2(sp_tokenizer, layers=2, seed=2).double().train(), None, big,
                                  halves, spec=spec, cache=signal)


def test_the_teacher_signal_verb_builds_once_and_a_later_run_reads_it(tmp_path, bpe_tokenizer, sp_tokenizer, docs):
    recipe = cross_recipe(tmp_path, bpe_tokenizer, sp_tokenizer, docs, {"uld": 1.0, "lm": 0.5})
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    refused = finish(start_kdistill("teacher-signal", recipe, "--out", tmp_path / "busy"))
    assert refused.returncode == 2 and "holds other files than a teacher signal" in refused.stderr
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"

    built = finish(start_kdistill("teacher-signal", recipe, "--out", tmp_path / "signal"))  # the real CLI
    assert built.returncode == 0, built.stderr
    where = Path(built.stdout.strip().splitlines()[-1])
    signal = open_teacher_signal(where)
    assert where == tmp_path / "signal" and signal.has_ends and len(signal) > 0
    assert cli.teacher_signal(str(recipe), out=where) == where  # complete: opened again, nothing recomputed
    with pytest.raises(UserError, match="holds the complete signal of another teacher, data or k"):
        cli.teacher_signal(str(recipe), set=["distill.cache_top_k=4"], out=where)
    assert open_teacher_signal(where).key == signal.key  # untouched
    cfg = load_config(recipe, [f"distill.teacher_signal={where}", "distill.baseline=false"])
    metrics = json.loads((run(cfg, tmp_path / "run") / "metrics.json").read_text())
    assert metrics["teacher_cache"]["status"] == "prebuilt" and metrics["teacher_cache"]["key"] == signal.key
