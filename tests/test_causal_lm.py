"""Causal-LM distillation: packing and splits, every LM loss term in the loop, step-level normalisation under
gradient accumulation, on-policy / sequence-level KD steps, a tiny GPT-2 end to end, and the real GGUF teacher."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from kdistill import losses
from kdistill.cache import build_topk_cache
from kdistill.cli import main
from kdistill.config import DataConfig, DistillConfig, TrainConfig
from kdistill.data import LMBlocks, load_lm_corpus, next_token_targets, pack_blocks
from kdistill.strategies.causal import distill_causal, generate_continuations, generate_responses, with_targets
from kdistill.measure import block_parameters, perplexity
from kdistill.teacher import load_causal_teacher
from kdistill.terms import TermSpec
from kdistill.tokenalign import token_byte_lengths
from kdistill.training import make_accelerator
from tests.conftest import tiny_gpt2
from tests.helpers import accumulate_step, assert_halves_match_one_batch
from kdistill.strategies.phase import Phase

@pytest.fixture(scope="module")
def tiny_teacher_dir(tmp_path_factory, bpe_tokenizer):
    path = tmp_path_factory.mktemp("tiny_gpt2")
    tiny_gpt2(bpe_tokenizer).save_pretrained(path)
    bpe_tokenizer.save_pretrained(path)
    return path


# --------------------------------------------------------------------------------------------- data, packing


def test_pack_blocks_joins_documents_with_eos_and_pads_the_last_block(bpe_tokenizer):
    texts = ["the team won", "the market lost record profits today"]
    ids = [bpe_tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    eos = bpe_tokenizer.eos_token_id
    flat = ids[0] + [eos] + ids[1] + [eos]
    blocks = pack_blocks(texts, bpe_tokenizer, block_size=4)
    assert blocks.input_ids.shape == (math.ceil(len(flat) / 4), 4)
    assert blocks.input_ids.flatten()[: len(flat)].tolist() == flat
    assert blocks.tokens == len(flat)
    assert blocks.attention_mask.flatten()[len(flat):].sum() == 0  # padding only at the very end


def test_next_token_targets_count_only_real_next_tokens_after_the_prompt():
    ids = torch.tensor([[5, 6, 7, 8], [1, 2, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    labels, valid = next_token_targets(ids, mask)
    assert labels[0, :3].tolist() == [6, 7, 8]
    assert valid.tolist() == [[True, True, True, False], [True, False, False, False]]
    _, valid = next_token_targets(ids, mask, prompt_length=2)  # only tokens 2.. are targets
    assert valid.tolist() == [[False, True, True, False], [False, False, False, False]]


class _UniformLM(torch.nn.Module):
    """Zero logits over `vocab` tokens: every next token costs exactly ln(vocab) nats."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # perplexity() reads the device from a parameter

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))


def test_bits_per_byte_divides_the_nll_by_the_bytes_of_the_predicted_text(bpe_tokenizer):
    texts = ["the team won the cup", "naïve profits rose — again"]  # multi-byte characters too
    blocks = pack_blocks(texts, bpe_tokenizer, block_size=64)  # one block: every token but the first is predicted
    assert len(blocks) == 1
    vocab = len(bpe_tokenizer)
    out = perplexity(_UniformLM(vocab), blocks, batch_size=2, byte_lengths=token_byte_lengths(bpe_tokenizer))
    first = bpe_tokenizer.decode(blocks.input_ids[0, :1].tolist())
    assert out["tokens"] == blocks.tokens - 1
    # counted from the texts, not from the table: all their bytes but the first token's (the EOS tokens add none)
    assert out["bytes"] == sum(len(t.encode("utf-8")) for t in texts) - len(first.encode("utf-8"))
    # float32 log-sum-exp of zeros: ln(vocab) to ~1e-7 relative, summed in float64
    assert out["bits_per_byte"] == pytest.approx(out["tokens"] * math.log2(vocab) / out["bytes"], rel=1e-5)
    assert out["perplexity"] == pytest.approx(vocab, rel=1e-5)
    assert "bits_per_byte" not in perplexity(_UniformLM(vocab), blocks)  # no table, no bytes


def test_corpus_is_split_by_document_seeded_and_without_leaks(tmp_path, docs):
    path = tmp_path / "corpus.jsonl"
    rows = [{"body": d} for d in docs] + [{"body": docs[0]}]  # one duplicate document
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    cfg = DataConfig(train_file=str(path), text_column="body", test_fraction=0.2, validation_fraction=0.1, seed=3)
    a, b = load_lm_corpus(cfg), load_lm_corpus(cfg)
    assert a.docs == b.docs
    train = set(a.docs["train"])
    assert not train & set(a.docs["test"]) and not train & set(a.docs["validation"])
    assert sum(len(v) for v in a.docs.values()) + a.leakage["test_docs_also_in_train"] \
        + a.leakage["validation_docs_also_in_train"] == len(rows)
    capped = load_lm_corpus(cfg.model_copy(update={"limit": 5}))
    assert all(len(v) <= 5 for v in capped.docs.values())
    other = load_lm_corpus(cfg.model_copy(update={"seed": 4}))
    assert other.docs["test"] != a.docs["test"]


# --------------------------------------------------------------------------------------- loss terms in the loop


def _batch(tokenizer, docs, rows=4, length=16, pad_last=0):
    blocks = pack_blocks(docs, tokenizer, length)
    batch = blocks.batch(slice(0, rows))
    if pad_last:
        batch["attention_mask"][-1, -pad_last:] = 0
    batch["idx"] = torch.arange(rows)
    return with_targets(batch)


REFERENCE = {
    "forward_kl": lambda s, t, d, T: losses.forward_kl_tokens(s, t, temperature=T),
    "reverse_kl": lambda s, t, d, T: losses.reverse_kl_tokens(s, t, temperature=T),
    "jsd": lambda s, t, d, T: losses.generalized_jsd_tokens(s, t, beta=d.gjsd_beta, temperature=T),
    "skew_kl": lambda s, t, d, T: losses.skew_kl_tokens(s, t, alpha=d.skew_alpha, temperature=T),
    "skew_reverse_kl": lambda s, t, d, T: losses.skew_reverse_kl_tokens(s, t, alpha=d.skew_alpha, temperature=T),
}


@pytest.mark.parametrize("term", [*REFERENCE, "lm", "hidden_mse"])
def test_each_lm_term_in_the_loop_matches_a_reference_and_trains(term, bpe_tokenizer, docs):
    teacher, student = tiny_gpt2(bpe_tokenizer, seed=1), tiny_gpt2(bpe_tokenizer, layers=2, seed=2).train()
    batch = _batch(bpe_tokenizer, docs, pad_last=5)
    distill = DistillConfig(losses={term: 1.0}, gjsd_beta=0.3, skew_alpha=0.2)
    spec = TermSpec({term: 1.0}, [(1, 2), (2, 4)], {"gjsd_beta": distill.gjsd_beta, "skew_alpha": distill.skew_alpha})
    accelerator = make_accelerator(TrainConfig())
    logged = accumulate_step(student, teacher, [batch], spec=spec, temperature=2.0, accelerator=accelerator)
    valid = batch["valid"]
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    keep = valid.bool()
    if term == "lm":
        expected = torch.nn.functional.cross_entropy(s.logits[keep], batch["labels"][keep]).item()
    elif term == "hidden_mse":
        expected = sum(((s.hidden_states[a] - t.hidden_states[b])[keep] ** 2).sum()
                       for a, b in [(1, 2), (2, 4)]).item() / (2 * int(keep.sum()) * 32)
    else:  # the reference on the counted tokens only: padding and last positions must not matter
        total, count = REFERENCE[term](s.logits[keep], t.logits[keep], distill, 2.0)
        expected = (total / count).item()
    assert logged[term] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    assert expected > 0
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for p in teacher.parameters())  # the teacher never learns


class _AllLogits(torch.nn.Module):
    """The same model behind a forward that cannot keep logits at chosen positions (no `logits_to_keep`)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, **kwargs):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


@pytest.mark.parametrize("terms", [{"forward_kl": 1.0, "lm": 0.5}, {"jsd": 1.0}])
def test_prompt_rows_project_only_their_response_columns_onto_the_vocabulary(terms, bpe_tokenizer, docs):
    """Prompt + response rows: the models compute logits only over the columns that hold targets, and every term
    and gradient equals the one over whole rows (float64 models: the same sums to ~1e-15)."""
    teacher = tiny_gpt2(bpe_tokenizer, seed=1).double()
    batch = pack_blocks(docs, bpe_tokenizer, 16).batch(slice(0, 4))
    batch["attention_mask"][1, -3:] = 0
    batch = with_targets({**batch, "prompt_length": torch.tensor([9, 11, 8, 12])})
    assert batch["valid"][:, :7].sum() == 0 and batch["valid"].sum() > 0
    spec = TermSpec(terms, [], {"gjsd_beta": 0.4})
    accelerator = make_accelerator(TrainConfig())
    widths, results = [], []
    for wrap in (lambda m: m, _AllLogits):
        student = tiny_gpt2(bpe_tokenizer, layers=2, seed=2).double().train()
        hook = student.lm_head.register_forward_hook(lambda m, i, out: widths.append(out.shape[1]))
        logged = accumulate_step(wrap(student), wrap(teacher), [batch], spec=spec, temperature=2.0,
                                 accelerator=accelerator)
        hook.remove()
        results.append((logged, [p.grad.clone() for p in student.parameters()]))
    assert widths == [8, 16]  # columns 7 (prompt 8 predicts its first response token) to 14 (15 predicts none)
    (windowed, g_windowed), (whole, g_whole) = results
    for term in terms:
        assert windowed[term] == pytest.approx(whole[term], rel=1e-6) and whole[term] > 0
    for a, b in zip(g_windowed, g_whole):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_validation_perplexity_of_prompt_rows_is_the_same_with_logits_on_their_responses_only(bpe_tokenizer, docs):
    packed = pack_blocks(docs, bpe_tokenizer, 16)
    blocks = LMBlocks(packed.input_ids[:6], packed.attention_mask[:6],
                      prompt_lengths=torch.tensor([9, 11, 8, 12, 10, 7]))
    model = tiny_gpt2(bpe_tokenizer, seed=3).double()
    widths = []
    model.lm_head.register_forward_hook(lambda m, i, out: widths.append(out.shape[1]))
    windowed, whole = perplexity(model, blocks, batch_size=3), perplexity(_AllLogits(model), blocks, batch_size=3)
    assert widths == [8, 9, 16, 16]  # rows 0-2 from column 7, rows 3-5 from column 6; then whole rows
    assert windowed["tokens"] == whole["tokens"] > 0
    assert windowed["loss"] == pytest.approx(whole["loss"], rel=1e-9)


def test_full_vocabulary_cache_equals_the_live_teacher(tmp_path, bpe_tokenizer, docs):
    """With K = V the cached forward KL (renormalised over the stored support) is the full-vocabulary loss."""
    teacher, student = tiny_gpt2(bpe_tokenizer, seed=1), tiny_gpt2(bpe_tokenizer, layers=2, seed=2)
    batch = _batch(bpe_tokenizer, docs)
    blocks = LMBlocks(batch["input_ids"], batch["attention_mask"])
    cache = build_topk_cache(teacher, blocks.input_ids, blocks.attention_mask, k=len(bpe_tokenizer), root=tmp_path)
    spec = TermSpec({"forward_kl": 1.0, "lm": 0.5}, [])
    accelerator = make_accelerator(TrainConfig())
    live = accumulate_step(student, teacher, [batch], spec=spec, temperature=1.5, accelerator=accelerator)
    cached = accumulate_step(student, None, [batch], spec=spec, temperature=1.5, accelerator=accelerator,
                             cache=cache)
    assert cached["forward_kl"] == pytest.approx(live["forward_kl"], rel=2e-3)
    assert cached["lm"] == pytest.approx(live["lm"], rel=1e-6)
    small = build_topk_cache(teacher, blocks.input_ids, blocks.attention_mask, k=8, root=tmp_path)
    topk = accumulate_step(student, None, [batch], spec=spec, temperature=1.5, accelerator=accelerator,
                           cache=small)
    assert topk["forward_kl"] != pytest.approx(live["forward_kl"], rel=1e-3)  # a different, renormalised support


@pytest.mark.parametrize("term", ["jsd", "forward_kl"])
def test_grad_accumulation_matches_one_big_batch(term, bpe_tokenizer, docs):
    """Two micro-batches with different numbers of real tokens give the loss and gradients of one batch.

    The models run in float64, so the forwards over 4 rows and over 2 + 2 rows (other kernels, other summation
    orders on each CPU) agree to ~1e-15. The losses still reduce in float32: summing n positive terms in float32 is
    exact to (n - 1) * eps relative, which bounds what the two paths may differ by; a wrong normalisation (a factor
    of the token counts) is orders of magnitude above it."""
    teacher = tiny_gpt2(bpe_tokenizer, seed=1).double()
    big = _batch(bpe_tokenizer, docs, rows=4, pad_last=9)
    halves = [{k: v[:2] for k, v in big.items()}, {k: v[2:] for k, v in big.items()}]
    assert halves[0]["valid"].sum() != halves[1]["valid"].sum()
    spec = TermSpec({term: 1.0, "lm": 0.3}, [], {"gjsd_beta": 0.4})
    assert_halves_match_one_batch(lambda: tiny_gpt2(bpe_tokenizer, layers=2, seed=2).double().train(), teacher,
                                  big, halves, spec=spec)


def test_generated_continuations_keep_the_prompt_and_count_only_new_tokens(bpe_tokenizer, docs):
    model = tiny_gpt2(bpe_tokenizer)
    batch = _batch(bpe_tokenizer, docs, rows=3, length=12)
    torch.manual_seed(0)
    out = generate_continuations(model, batch, pad_id=bpe_tokenizer.eos_token_id, eos_id=None)
    assert out["input_ids"].shape == (3, 12)
    assert torch.equal(out["input_ids"][:, :6], batch["input_ids"][:, :6])
    assert out["valid"][:, :5].sum() == 0 and out["valid"][:, 5:11].all()  # positions 5..10 predict 6..11


@pytest.mark.parametrize("max_new_tokens, generated", [(None, [6, 6]), (3, [3, 3])])
def test_generated_responses_keep_the_prompt_and_stop_at_the_response_budget(bpe_tokenizer, docs, max_new_tokens,
                                                                             generated):
    # rows padded to a width of 14 (the longest row of a whole set): room for 14 - 8 new tokens after the longest prompt
    batch = {**_batch(bpe_tokenizer, docs, rows=2, length=14), "prompt_length": torch.tensor([5, 8])}
    torch.manual_seed(0)
    out = generate_responses(tiny_gpt2(bpe_tokenizer), batch, pad_id=bpe_tokenizer.eos_token_id, eos_id=None,
                             max_new_tokens=max_new_tokens)
    assert torch.equal(out["input_ids"][0, :5], batch["input_ids"][0, :5])
    assert torch.equal(out["input_ids"][1, :8], batch["input_ids"][1, :8])
    assert out["valid"].sum(1).tolist() == generated  # only the generated tokens are targets


def test_on_policy_and_sequence_level_steps_run_and_are_logged(bpe_tokenizer, docs):
    teacher, student = tiny_gpt2(bpe_tokenizer, seed=1), tiny_gpt2(bpe_tokenizer, layers=2, seed=2)
    blocks = pack_blocks(docs[:20], bpe_tokenizer, 16)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    history = distill_causal(Phase(student=student, teachers=[teacher], tokenizer=None,
                                   data={"train": blocks, "validation": blocks},
                                   spec=TermSpec({"reverse_kl": 1.0, "lm": 1.0}, []),
                                   distill=DistillConfig(losses={"reverse_kl": 1.0}, on_policy_fraction=0.5,
                                                   seq_kd_fraction=0.5),
                                   train=TrainConfig(max_steps=6, batch_size=4, lr=1e-3, seed=0), task="causal-lm"),
                             eos_id=bpe_tokenizer.eos_token_id)
    kinds = [(s["on_policy"], s["seq_kd"]) for s in history.steps]
    assert (1.0, 0.0) in kinds and (0.0, 1.0) in kinds  # both generated sources were used
    assert all("lm" not in s or s["on_policy"] == 0 or s["lm"] == 0 for s in history.steps)
    assert all(math.isfinite(s["loss"]) for s in history.steps)
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert history.evals and math.isfinite(history.evals[-1]["perplexity"])


# ---------------------------------------------------------------------------------------------- end to end


def test_run_causal_lm_tiny_gpt2_end_to_end(tmp_path, monkeypatch, tiny_teacher_dir, docs):
    monkeypatch.setenv("KDISTILL_CACHE_DIR", str(tmp_path / "cache"))
    corpus = tmp_path / "news.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": d}) for d in docs), encoding="utf-8")
    recipe = tmp_path / "lm.yaml"
    recipe.write_text(f"""
name: tiny-lm
task: causal-lm
data: {{train_file: {corpus}, block_size: 32, test_fraction: 0.2, validation_fraction: 0.1}}
teacher: {{model: {tiny_teacher_dir}}}
student: {{layers: 2}}
distill: {{temperature: 1.0, losses: {{forward_kl: 1.0, lm: 0.5}}, cache_top_k: 16}}
train: {{max_steps: 4, batch_size: 4, grad_accum: 2, lr: 1.0e-3}}
eval: {{repeats: 2, warmup: 1, throughput_batch_size: 2}}
""", encoding="utf-8")
    out = tmp_path / "run"
    main(["run", str(recipe), "--out", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "causal-lm"
    assert set(metrics["models"]) == {"teacher", "student", "baseline"}
    for m in metrics["models"].values():
        assert m["perplexity"] > 1 and math.isfinite(m["perplexity"])
        assert m["bits_per_byte"] > 0 and m["n_test_bytes"] > m["n_test_tokens"]  # BPE tokens average > 1 byte
        assert m["generate_tokens_per_s"] > 0 and m["score_tokens_per_s"] > 0
    shape = metrics["student_shape"]
    assert shape["student"]["layers"] == 2 and shape["block_param_ratio"] == pytest.approx(0.5)
    assert metrics["teacher_cache"]["status"] == "built" and metrics["teacher_cache"]["k"] == 16
    assert len(metrics["samples"]["student"]) == 3
    report = (out / "report.md").read_text()
    assert "test perplexity" in report and "bits/byte" in report and "Sample generations" in report \
        and "baseline" in report
    student_meta = json.loads((out / "student" / "kdistill.json").read_text())
    assert student_meta["task"] == "causal-lm"
    from kdistill.models import load_model_dir

    model, _, _ = load_model_dir(out / "student")
    assert model.config.n_layer == 2

    # same data, same teacher: the second run reuses the cache and the teacher does not score the training set
    from kdistill.config import load_config
    from kdistill.pipeline import run

    run(load_config(recipe, ["train.seed=7", "distill.baseline=false"]), tmp_path / "run2")
    again = json.loads((tmp_path / "run2" / "metrics.json").read_text())
    assert again["teacher_cache"]["status"] == "reused"
    assert again["teacher_cache"]["path"] == metrics["teacher_cache"]["path"]
    assert set(again["models"]) == {"teacher", "student"}


def test_classification_terms_are_refused_for_causal_lm(tmp_path, tiny_teacher_dir, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "lm", "--set", f"teacher.model={tiny_teacher_dir}", "--set", "distill.losses={kd: 1.0}",
              "--out", str(tmp_path / "bad")])
    assert exc.value.code == 2
    assert "distill.losses" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ real GGUF teacher


@pytest.mark.slow
def test_gguf_teacher_loads_dequantised_and_predicts_english(tmp_path):
    from kdistill.config import RunConfig
    from kdistill.student import build_student

    cfg = RunConfig(task="causal-lm", teacher={"model": "smollm2-135m"}, distill={"losses": {"forward_kl": 1.0}})
    teacher, tokenizer, _, file_mb = load_causal_teacher(cfg)
    assert type(teacher).__name__ == "LlamaForCausalLM" and teacher.config.num_hidden_layers == 30
    assert next(teacher.parameters()).dtype == torch.float32
    assert getattr(teacher.config, "quantization_config", None) is None  # plain fp32 students
    assert 50 < file_mb < 200
    text = ("The government said on Monday that it would increase spending on schools and hospitals next year, "
            "after the economy grew faster than expected.")
    blocks = pack_blocks([text], tokenizer, 64)
    assert perplexity(teacher, blocks)["perplexity"] < 60  # a random model would be near 49152
    student = build_student(teacher, num_layers=10)
    assert block_parameters(student) * 3 <= block_parameters(teacher)
    teacher.save_pretrained(tmp_path / "whole")  # a GGUF model taken whole (e.g. a student.model) saves too
    assert (tmp_path / "whole" / "model.safetensors").is_file()
