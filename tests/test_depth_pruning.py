"""Depth pruning by Block Influence (ShortGPT, Men et al. 2024): the score, the choice it makes, and student.layer_map
importance in a run (metrics.json, report.md)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    BertModel,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import kdistill.student.build
from kdistill.cli import main
from kdistill.config import load_config
from kdistill.errors import UserError
from kdistill.pipeline import preflight
from kdistill.student import block_influence, build_student, find_layer_list, select_layers
from tests.conftest import tiny_bert_config, tiny_gpt2
from tests.helpers import given_teacher_recipe, tiny_lm_recipe

HIDDEN = 32
# cos(x, x) of a float32 vector of HIDDEN channels: the dot product and the two norms each round at most ~HIDDEN
# times by eps (relative), so 1 − cos(x, x) stays below HIDDEN · eps.
IDENTITY_TOL = HIDDEN * torch.finfo(torch.float32).eps
RESIDUAL_WRITERS = ("attn.c_proj.", "mlp.c_proj.", "self_attn.o_proj.", "mlp.down_proj.")
"""GPT-2's and Llama/Qwen2's projections that write into the residual stream: zeroed, the block returns its input."""


def tiny_gqa(config_cls, model_cls, layers: int = 4):
    """A random Llama / Qwen2 decoder, hidden 32, 4 query heads sharing 2 KV heads (grouped-query attention)."""
    torch.manual_seed(0)
    config = config_cls(vocab_size=64, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return model_cls(config).eval()


def tiny_llama():
    return tiny_gqa(LlamaConfig, LlamaForCausalLM)


def tiny_qwen2():
    return tiny_gqa(Qwen2Config, Qwen2ForCausalLM)


def random_ids(n: int, length: int, vocab: int = 64, seed: int = 0):
    return torch.randint(3, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def make_identity(model, k: int) -> None:
    _, blocks = find_layer_list(model)
    zeroed = [name for name, p in blocks[k].named_parameters() if name.startswith(RESIDUAL_WRITERS)]
    assert len(zeroed) >= 2  # the attention's and the MLP's output projection
    with torch.no_grad():
        for name, p in blocks[k].named_parameters():
            if name in zeroed:
                p.zero_()


def randomise_final_norm(model) -> None:
    """A final norm whose gain differs per channel: then cos(h, norm(h)) != 1 even for an RMSNorm, so scoring the
    last block against hidden_states[-1] (stored after that norm) would show."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.base_model.named_parameters():
            if name.startswith(("norm.", "ln_f.")):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("k", [1, 3])  # 3: the last block, whose output HF stores only after the final norm
def test_an_identity_block_has_zero_influence_and_is_dropped_first(family, k, bpe_tokenizer):
    model = tiny_gpt2(bpe_tokenizer) if family == "gpt2" else tiny_llama()
    randomise_final_norm(model)
    make_identity(model, k)
    batch = {"input_ids": random_ids(2, 12, vocab=64), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    scores = block_influence(model, batch)
    assert len(scores) == 4
    assert abs(scores[k]) < IDENTITY_TOL
    assert all(s > 100 * IDENTITY_TOL for i, s in enumerate(scores) if i != k)
    assert select_layers(4, 3, "importance", scores) == [i for i in range(4) if i != k]


def test_most_influential_blocks_come_back_in_layer_order():
    scores = [0.2, 0.5, 0.05, 0.4, 0.5]
    assert select_layers(5, 3, "importance", scores) == [1, 3, 4]
    assert select_layers(5, 1, "importance", scores) == [1]  # a tie keeps the lower layer
    with pytest.raises(ValueError, match=r"layer_map='importance' needs one Block Influence score per teacher "
                                         r"layer \(5\), got 4"):
        select_layers(5, 2, "importance", scores[:4])


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_scores_lie_in_0_2_and_padding_does_not_change_them(family, bpe_tokenizer, tiny_tokenizer):
    if family == "bert":
        torch.manual_seed(0)
        # large weights: at BERT's default 0.02 its post-LN blocks barely turn the hidden state (BI ~ 5e-5), and
        # the pad tokens' share of an unmasked mean would hide below the float tolerance
        config = tiny_bert_config(tiny_tokenizer, initializer_range=0.5)
        model, ids, pad = BertModel(config).eval(), random_ids(1, 10, 40), tiny_tokenizer.pad_token_id
    elif family == "gpt2":
        model, pad = tiny_gpt2(bpe_tokenizer), bpe_tokenizer.eos_token_id
        ids = bpe_tokenizer("The coach said the team won the final match.", return_tensors="pt")["input_ids"]
    else:
        model, ids, pad = tiny_llama(), random_ids(1, 10), 0
    n = ids.shape[1]
    plain = block_influence(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    padded_ids = torch.cat([ids, torch.full((1, 5), pad)], dim=1)
    mask = torch.cat([torch.ones(1, n, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long)], dim=1)
    padded = block_influence(model, {"input_ids": padded_ids, "attention_mask": mask})
    assert all(0.0 <= s <= 2.0 for s in plain)
    assert padded == pytest.approx(plain, abs=1e-6)


@pytest.mark.parametrize("make", [tiny_llama, tiny_qwen2])
def test_a_gqa_decoder_cut_to_its_two_most_influential_blocks_saves_and_loads(make, tmp_path):
    teacher = make()
    batch = {"input_ids": random_ids(4, 16), "attention_mask": torch.ones(4, 16, dtype=torch.long)}
    student = build_student(teacher, num_layers=2, layer_map="importance", calibration_inputs=batch)
    info = student.kdistill_init
    assert info["block_influence"] == pytest.approx(block_influence(teacher, batch), abs=1e-6)
    kept = info["teacher_layers"]
    assert kept == sorted(sorted(range(4), key=lambda i: -info["block_influence"][i])[:2])
    assert student.config.num_hidden_layers == 2 and student.config.num_key_value_heads == 2
    for new, old in enumerate(kept):  # the kept blocks are the teacher's, unchanged
        t_state, s_state = teacher.model.layers[old].state_dict(), student.model.layers[new].state_dict()
        assert all(torch.equal(t_state[key], s_state[key]) for key in t_state)
    with torch.no_grad():
        logits = student(**batch).logits
    assert logits.shape == (4, 16, 64) and torch.isfinite(logits).all()
    student.save_pretrained(tmp_path / "student")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    assert type(loaded) is type(teacher) and loaded.config.num_hidden_layers == 2
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, logits, atol=1e-5)


def test_importance_needs_a_calibration_batch(bpe_tokenizer):
    with pytest.raises(ValueError, match=r"layer_map='importance' ranks the teacher's blocks on a calibration batch"):
        build_student(tiny_gpt2(bpe_tokenizer), num_layers=2, layer_map="importance")


# ---------------------------------------------------------------------------------------------------- in a run


@pytest.fixture
def lm_recipe(tmp_path, bpe_tokenizer, docs, monkeypatch):
    """The tiny causal-LM recipe, its GPT-2 teacher's last block an identity: uniform would keep it ([0, 3])."""
    monkeypatch.setenv("KDISTILL_CACHE_DIR", str(tmp_path / "cache"))
    recipe = tiny_lm_recipe(tmp_path, bpe_tokenizer, docs, losses={"forward_kl": 1.0},
                            train={"max_steps": 1, "batch_size": 4})
    teacher = GPT2LMHeadModel.from_pretrained(tmp_path / "teacher")
    make_identity(teacher, 3)
    teacher.save_pretrained(tmp_path / "teacher")
    return recipe


def test_a_causal_lm_run_keeps_the_most_influential_blocks_and_reports_them(lm_recipe, tmp_path, monkeypatch):
    seen = []

    def spy(model, calibration_inputs):
        seen.append((calibration_inputs["input_ids"].shape, block_influence(model, calibration_inputs)))
        return seen[-1][1]

    monkeypatch.setattr(kdistill.student.build, "block_influence", spy)
    out = tmp_path / "run"
    main(["run", str(lm_recipe), "--set", "student.layer_map=importance", "--set", "distill.baseline=false",
          "--out", str(out)])
    (shape, scores), = seen
    assert shape == (8, 16)  # the first 8 training blocks
    init = json.loads((out / "metrics.json").read_text(encoding="utf-8"))["student_shape"]["init"]
    assert init["block_influence"] == scores  # as measured: JSON keeps a float's every digit
    assert abs(scores[3]) < IDENTITY_TOL
    assert init["teacher_layers"] == select_layers(4, 2, "importance", scores) and 3 not in init["teacher_layers"]
    assert GPT2LMHeadModel.from_pretrained(out / "student").config.n_layer == 2
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "Block Influence per teacher block" in report
    assert all(f"**{i}: {scores[i]:.4f}**" in report for i in init["teacher_layers"])
    assert f"3: {scores[3]:.4f}" in report and "**3:" not in report


def test_a_bad_layer_count_with_importance_is_refused_before_the_run(lm_recipe, tmp_path):
    cfg = load_config(lm_recipe, ["student.layer_map=importance", "student.layers=9"])
    with pytest.raises(UserError, match=r"^student\.layers: num_layers=9 must be an integer from 1 to the "
                                        r"teacher's 4 layers"):
        preflight(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_classification_run_ranks_the_encoder_blocks(tmp_path, tiny_tokenizer):
    recipe = given_teacher_recipe(tmp_path, tiny_tokenizer, {"kd": 1.0})
    out = tmp_path / "run"
    main(["run", str(recipe), "--set", "student.layer_map=importance", "--out", str(out)])
    init = json.loads((out / "metrics.json").read_text(encoding="utf-8"))["student_shape"]["init"]
    assert len(init["block_influence"]) == 4 and all(0.0 <= s <= 2.0 for s in init["block_influence"])
    assert init["teacher_layers"] == select_layers(4, 2, "importance", init["block_influence"])
    assert "Block Influence per teacher block" in (out / "report.md").read_text(encoding="utf-8")
