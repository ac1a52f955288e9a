"""Width pruning of GQA decoders (Minitron, Muralidharan et al. 2024): exact copies when nothing that matters is cut,
whole KV groups, planted important units kept, a config that saves and loads, and a causal-lm run on the result."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import (
    AutoModelForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from kdistill.cli import main
from kdistill.config import load_config
from kdistill.decoder_width import decoder_importance, plan_decoder_width, resolve_decoder_width, slice_decoder_state
from kdistill.errors import ConfigError, UserError
from kdistill.pipeline import preflight
from kdistill.student import build_student
from tests.conftest import tiny_gpt2
from tests.helpers import tiny_lm_recipe, write_recipe

VOCAB, HIDDEN, FFN, HEADS, HEAD_DIM = 100, 64, 128, 8, 8
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"tie_word_embeddings": True}),  # q/k/v biases, tied lm_head
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": HEAD_DIM}),  # q_norm / k_norm
    # sandwich norms, √hidden embedding scale, tied lm_head; sliding_window 4 < T, so local layers mask too
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM, {"head_dim": HEAD_DIM, "query_pre_attn_scalar": HEAD_DIM,
                                                     "sliding_window": 4}),
}


def tiny_decoder(family: str, kv_heads: int = 2, vocab: int = VOCAB, seed: int = 0, **overrides):
    """A random 4-layer decoder: hidden 64, 8 query heads of 8 sharing `kv_heads` KV heads, MLP 128."""
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_cls(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=4,
                        num_attention_heads=HEADS, num_key_value_heads=kv_heads, max_position_embeddings=64,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0, **{**extra, **overrides})
    model = model_cls(config).eval()
    low = -0.5 if family == "gemma3" else 0.5  # Gemma's RMSNorm multiplies by 1 + weight
    with torch.no_grad():  # norms start at gain 1; random gains make a wrong channel slice show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(low, low + 1)
    return model


def calibration(n: int = 4, length: int = 12, seed: int = 0) -> dict:
    ids = torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, length // 2:] = 0  # a padded row: its padding must not count
    return {"input_ids": ids, "attention_mask": mask}


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def assert_same_function(student, teacher, batch):
    """Equal up to float32 rounding. A pruned matmul sums fewer terms, maybe in another order: the rounding errors
    of a K-term sum, of random sign, grow like √K·eps ≈ 1.4e-6 relative (K ≤ 128, eps = 1.2e-7); a few such sums in
    series through 4 blocks stay below 1e-5 of the logits' scale, while a wrong slice moves logits by their own
    order of magnitude."""
    want, got = logits(teacher, batch), logits(student, batch)
    real = batch["attention_mask"].bool()
    scale = want[real].abs().max()
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-5 * scale.item())


def q_rows(heads) -> list[int]:
    return [h * HEAD_DIM + d for h in heads for d in range(HEAD_DIM)]


def full_widths(teacher) -> dict:
    c = teacher.config
    return {"hidden_size": c.hidden_size, "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads, "intermediate_size": c.intermediate_size}


# ------------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("family", list(FAMILIES))
def test_keeping_every_unit_reproduces_the_teacher(family):
    """The plan + slice path itself (build_student copies the state untouched when no width shrinks)."""
    teacher = tiny_decoder(family)
    batch = calibration()
    plan = plan_decoder_width(teacher, range(4), full_widths(teacher), batch)
    assert plan.hidden.tolist() == list(range(HIDDEN)) and plan.q_rows(0).tolist() == list(range(HEADS * HEAD_DIM))
    copy = type(teacher)(teacher.config).eval()
    copy.load_state_dict(slice_decoder_state(teacher, teacher.state_dict(), copy.state_dict(), "model.layers.", plan))
    assert_same_function(copy, teacher, batch)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_dead_kv_groups_and_neurons_are_the_ones_pruned_and_pruning_them_is_exact(family):
    """A KV group whose V is zero writes nothing (softmax · 0 = 0, whatever Q·K), a neuron whose gate and up rows are
    zero neither: they score 0, are cut first, and the student computes the teacher's function."""
    teacher = tiny_decoder(family, kv_heads=4)  # groups of 2 query heads
    dead_group, dead = 1, torch.arange(0, FFN, 2)  # every other neuron
    with torch.no_grad():
        for layer in teacher.model.layers:
            layer.self_attn.v_proj.weight[dead_group * HEAD_DIM:(dead_group + 1) * HEAD_DIM] = 0
            if layer.self_attn.v_proj.bias is not None:
                layer.self_attn.v_proj.bias[dead_group * HEAD_DIM:(dead_group + 1) * HEAD_DIM] = 0
            layer.mlp.gate_proj.weight[dead] = 0
            layer.mlp.up_proj.weight[dead] = 0
    batch = calibration()
    student = build_student(teacher, num_key_value_heads=3, intermediate_size=FFN // 2, init="pruned",
                            calibration_inputs=batch).eval()
    assert (student.config.num_attention_heads, student.config.num_key_value_heads) == (6, 3)
    kept_groups, live = [0, 2, 3], torch.arange(1, FFN, 2)
    for t_layer, s_layer in zip(teacher.model.layers, student.model.layers):
        assert torch.equal(s_layer.self_attn.k_proj.weight, t_layer.self_attn.k_proj.weight[q_rows(kept_groups)])
        assert torch.equal(s_layer.mlp.down_proj.weight, t_layer.mlp.down_proj.weight[:, live])
    assert_same_function(student, teacher, batch)


# --------------------------------------------------------------------------------------------- GQA groups


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_kept_query_heads_are_those_of_the_kept_kv_groups(family):
    teacher = tiny_decoder(family, kv_heads=4)  # query heads 2g, 2g+1 read KV head g
    student = build_student(teacher, num_attention_heads=4, init="pruned", calibration_inputs=calibration())
    config = student.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, HEAD_DIM)
    assert config.num_attention_heads // config.num_key_value_heads == HEADS // 4
    for t_layer, s_layer in zip(teacher.model.layers, student.model.layers):
        t_attn, s_attn = t_layer.self_attn, s_layer.self_attn
        t_k = t_attn.k_proj.weight.unflatten(0, (4, HEAD_DIM))
        groups = [g for g in range(4) if any(torch.equal(t_k[g], s) for s in s_attn.k_proj.weight.split(HEAD_DIM))]
        assert len(groups) == 2  # every kept KV head is one of the teacher's, whole
        heads = [2 * g + j for g in groups for j in range(2)]
        assert torch.equal(s_attn.k_proj.weight, t_attn.k_proj.weight[q_rows(groups)])
        assert torch.equal(s_attn.v_proj.weight, t_attn.v_proj.weight[q_rows(groups)])
        assert torch.equal(s_attn.q_proj.weight, t_attn.q_proj.weight[q_rows(heads)])
        assert torch.equal(s_attn.o_proj.weight, t_attn.o_proj.weight[:, q_rows(heads)])
        if t_attn.q_proj.bias is not None:
            assert torch.equal(s_attn.q_proj.bias, t_attn.q_proj.bias[q_rows(heads)])


@pytest.mark.parametrize(("widths", "error"), [
    ({"num_attention_heads": 5}, r"^num_attention_heads=5 is not a multiple of the teacher's 4 query heads per KV "
                                 r"head \(8 heads / 2 KV heads; whole KV groups are kept or dropped\); try 4$"),
    ({"num_attention_heads": 4, "num_key_value_heads": 2}, r"^num_attention_heads=4 with num_key_value_heads=2 breaks "
                                                           r".*give num_attention_heads=8 or only one"),
    ({"num_key_value_heads": 3}, r"^num_key_value_heads=3 is larger than the teacher's 2"),
    ({"num_key_value_heads": 0}, r"^num_key_value_heads=0 must be a positive integer"),
    ({"hidden_size": 65}, r"^hidden_size=65 is larger than the teacher's 64"),
    ({"intermediate_size": True}, r"^intermediate_size=True must be a positive integer"),
])
def test_impossible_widths_are_refused_naming_the_key(widths, error):
    with pytest.raises(ValueError, match=error):
        build_student(tiny_decoder("llama"), init="pruned", calibration_inputs=calibration(), **widths)


def test_widths_resolve_by_whole_groups_and_leave_hidden_free():
    config = tiny_decoder("llama").config  # 8 heads, 2 KV heads
    assert resolve_decoder_width(config, 40, 4, None, None) == {
        "hidden_size": 40, "num_attention_heads": 4, "num_key_value_heads": 1, "intermediate_size": FFN}
    assert resolve_decoder_width(config, None, None, 1, 96)["num_attention_heads"] == 4


def test_other_families_and_missing_calibration_are_refused(bpe_tokenizer):
    with pytest.raises(NotImplementedError, match=r"not 'gpt2' \(GPT2LMHeadModel\)"):
        build_student(tiny_gpt2(bpe_tokenizer), num_key_value_heads=1)
    with pytest.raises(ValueError, match=r"ranks KV groups, neurons and channels on a calibration batch"):
        build_student(tiny_decoder("llama"), intermediate_size=64)
    random = build_student(tiny_decoder("llama"), hidden_size=32, num_key_value_heads=1, init="random")
    assert random.model.layers[0].self_attn.q_proj.weight.shape == (4 * HEAD_DIM, 32)


# ------------------------------------------------------------------------------------- planted importance


def test_a_planted_dominant_neuron_kv_group_and_channel_are_kept():
    teacher = tiny_decoder("llama", kv_heads=4)
    neuron, group, channel = 77, 2, 13
    with torch.no_grad():
        teacher.model.embed_tokens.weight[:, channel] *= 10  # the residual stream's channel 13 stands out everywhere
        for layer in teacher.model.layers:
            layer.mlp.gate_proj.weight[neuron] *= 5  # act(gate) · up: both grow
            layer.mlp.up_proj.weight[neuron] *= 5
            layer.self_attn.v_proj.weight[group * HEAD_DIM:(group + 1) * HEAD_DIM] *= 10  # its heads' outputs grow
    batch = calibration()
    scores = decoder_importance(teacher, range(4), batch)
    assert scores["hidden"].argmax() == channel
    assert all(s.argmax() == neuron for s in scores["neurons"])
    assert all(s.argmax() == group for s in scores["groups"])

    student = build_student(teacher, hidden_size=16, num_key_value_heads=1, intermediate_size=8, init="pruned",
                            calibration_inputs=batch)
    kept = [c for c in range(HIDDEN) if any(torch.equal(teacher.model.embed_tokens.weight[:, c], col)
                                            for col in student.model.embed_tokens.weight.T)]
    assert channel in kept and len(kept) == 16
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight[:, kept])
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight[:, kept])
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight[kept])
    for t_layer, s_layer in zip(teacher.model.layers, student.model.layers):
        heads = [2 * group, 2 * group + 1]
        assert torch.equal(s_layer.self_attn.q_proj.weight, t_layer.self_attn.q_proj.weight[q_rows(heads)][:, kept])
        assert torch.equal(s_layer.self_attn.k_proj.weight, t_layer.self_attn.k_proj.weight[q_rows([group])][:, kept])
        assert torch.equal(s_layer.self_attn.o_proj.weight, t_layer.self_attn.o_proj.weight[kept][:, q_rows(heads)])
        rows = [r for r in range(FFN) if any(torch.equal(t_layer.mlp.up_proj.weight[r, kept], s)
                                             for s in s_layer.mlp.up_proj.weight)]
        assert neuron in rows and len(rows) == 8
        assert torch.equal(s_layer.mlp.gate_proj.weight, t_layer.mlp.gate_proj.weight[rows][:, kept])
        assert torch.equal(s_layer.mlp.down_proj.weight, t_layer.mlp.down_proj.weight[kept][:, rows])
        assert torch.equal(s_layer.input_layernorm.weight, t_layer.input_layernorm.weight[kept])
        assert torch.equal(s_layer.post_attention_layernorm.weight, t_layer.post_attention_layernorm.weight[kept])


@pytest.mark.parametrize("tied", [False, True])
def test_gemma_embeddings_enter_the_residual_stream_at_the_teachers_scale_when_untied(tied):
    """Gemma scales embeddings by √hidden_size, √32 in the student against √64: an untied embedding is rescaled so
    that the student's residual stream starts as the teacher's kept channels; a tied one is the LM head too, and
    is left as sliced."""
    teacher = tiny_decoder("gemma3", tie_word_embeddings=tied)
    batch = calibration()
    student = build_student(teacher, hidden_size=32, init="pruned", calibration_inputs=batch)
    kept = plan_decoder_width(teacher, range(4), {**full_widths(teacher), "hidden_size": 32}, batch).hidden
    with torch.no_grad():
        want = teacher.model.embed_tokens(batch["input_ids"])[..., kept]
        got = student.model.embed_tokens(batch["input_ids"])
    torch.testing.assert_close(got, want if not tied else want * (32 / 64) ** 0.5)
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight[:, kept])  # the logits keep their scale


def test_padding_does_not_change_the_ranking():
    teacher = tiny_decoder("qwen2")
    batch = calibration()
    scores = decoder_importance(teacher, range(4), batch)
    garbage = dict(batch, input_ids=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 7))
    again = decoder_importance(teacher, range(4), garbage)  # causal attention: padding at the end is never read
    torch.testing.assert_close(again["hidden"], scores["hidden"], rtol=1e-6, atol=0)
    for a, b in zip(again["groups"] + again["neurons"], scores["groups"] + scores["neurons"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------------- save and load


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_pruned_student_saves_and_loads_as_a_plain_hf_model(family, tmp_path):
    teacher = tiny_decoder(family)
    batch = calibration()
    student = build_student(teacher, num_layers=3, hidden_size=40, num_key_value_heads=1, intermediate_size=96,
                            init="pruned", calibration_inputs=batch).eval()
    student.save_pretrained(tmp_path / "student")
    saved = json.loads((tmp_path / "student" / "config.json").read_text(encoding="utf-8"))
    assert (saved["hidden_size"], saved["num_attention_heads"], saved["num_key_value_heads"], saved["head_dim"],
            saved["intermediate_size"], saved["num_hidden_layers"]) == (40, 4, 1, HEAD_DIM, 96, 3)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    assert type(loaded) is type(teacher)
    if teacher.config.tie_word_embeddings:
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(logits(loaded, batch), logits(student, batch), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- in a run


def decoder_lm_recipe(tmp_path, bpe_tokenizer, docs, family: str, student: dict):
    """The tiny causal-LM recipe over a saved tiny `family` teacher instead of GPT-2."""
    recipe = tiny_lm_recipe(tmp_path, bpe_tokenizer, docs, losses={"forward_kl": 1.0, "lm": 0.5},
                            train={"max_steps": 2, "batch_size": 4})
    tiny_decoder(family, vocab=len(bpe_tokenizer)).save_pretrained(tmp_path / "teacher")
    raw = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    raw["student"].update(student)
    raw["distill"]["baseline"] = False
    return write_recipe(recipe, raw)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_causal_lm_run_distils_a_width_pruned_student(family, tmp_path, bpe_tokenizer, docs, monkeypatch):
    monkeypatch.setenv("KDISTILL_CACHE_DIR", str(tmp_path / "cache"))
    recipe = decoder_lm_recipe(tmp_path, bpe_tokenizer, docs, family, {
        "layers": 2, "hidden_size": 48, "num_key_value_heads": 1, "intermediate_size": 64, "init": "pruned"})
    out = tmp_path / "run"
    main(["run", str(recipe), "--out", str(out)])
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    shape = metrics["student_shape"]
    assert (shape["student"]["layers"], shape["student"]["hidden"], shape["student"]["heads"],
            shape["student"]["ffn"]) == (2, 48, 4, 64)
    assert shape["init"]["ranking"] == "activations"
    assert metrics["models"]["student"]["perplexity"] > 1
    student = AutoModelForCausalLM.from_pretrained(out / "student")
    assert (student.config.num_key_value_heads, student.config.head_dim) == (1, HEAD_DIM)


def test_bad_gqa_widths_are_refused_before_the_run(tmp_path, bpe_tokenizer, docs):
    recipe = decoder_lm_recipe(tmp_path, bpe_tokenizer, docs, "llama", {"init": "pruned"})
    with pytest.raises(UserError, match=r"^student\.num_attention_heads=6 is not a multiple of the teacher's 4 query"):
        preflight(load_config(recipe, ["student.num_attention_heads=6"]), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    for value in ("0", "two"):
        with pytest.raises(ConfigError, match=r"student\.num_key_value_heads"):
            load_config(recipe, [f"student.num_key_value_heads={value}"])


def test_a_run_with_an_unsupported_decoder_width_names_the_model_type(tmp_path, bpe_tokenizer, docs, monkeypatch,
                                                                     capsys):
    monkeypatch.setenv("KDISTILL_CACHE_DIR", str(tmp_path / "cache"))
    recipe = tiny_lm_recipe(tmp_path, bpe_tokenizer, docs, losses={"forward_kl": 1.0}, train={"max_steps": 1})
    with pytest.raises(SystemExit) as exc:  # the tiny GPT-2 teacher
        main(["run", str(recipe), "--set", "student.hidden_size=16", "--set", "student.init=pruned",
              "--out", str(tmp_path / "run")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "not 'gpt2' (GPT2LMHeadModel)" in err and "llama" in err
