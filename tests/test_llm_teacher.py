"""Classification with a prompted LLM as the teacher (teacher.llm), on a tiny random causal LM with a ChatML template
and a tiny encoder student: the verbalizer scores against a hand computation, the prompt's rendering, the store
(reused, resumed after a kill), a whole run's metrics and report, and the config's one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BertModel, GPT2LMHeadModel

import kdistill.cache.label_scores as label_scores
from kdistill.cache.label_scores import answer_logprobs, llm_label_scores
from kdistill.cli import main
from kdistill.config import load_config
from kdistill.data import load_data
from kdistill.errors import ConfigError, UserError
from kdistill.models import load_model_dir
from kdistill.pipeline import run
from kdistill.pipeline.llm_teacher import calibrated, llm_inputs, verbalizers
from tests.conftest import tiny_bert_config
from tests.helpers import write_recipe, write_toy_csv
from tests.test_instruction import chat_model_dir, chat_tokenizer  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory, chat_tokenizer):  # noqa: F811
    return chat_model_dir(tmp_path_factory.mktemp("llm"), chat_tokenizer)


@pytest.fixture(scope="module")
def llm(llm_dir):
    return GPT2LMHeadModel.from_pretrained(llm_dir).eval()


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny random encoder without a classification head: the student gets one for the data's labels."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("encoder")
    BertModel(tiny_bert_config(tiny_tokenizer, num_hidden_layers=2)).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def hand_logprob(model, prompt: list[int], answer: list[int]) -> float:
    """log P(answer | prompt) from one unpadded forward over prompt + answer: Σ_j log_softmax(logits at the position
    before a_j)[a_j]."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + answer])).logits[0]
    logp = logits.log_softmax(-1)
    return sum(float(logp[len(prompt) - 1 + j, token]) for j, token in enumerate(answer))


def test_verbalizer_scores_are_the_answer_tokens_summed_log_probabilities(llm):
    prompts = [[5, 9, 17, 3], [40, 2], [7, 7, 7, 7, 7, 11, 12]]  # of different lengths: left padding must not count
    answers = [[21], [30, 31], [30, 44, 45], [50, 51, 52]]  # one token; two and three sharing a first; another three
    got = answer_logprobs(llm, prompts, answers, pad_id=0)
    want = torch.tensor([[hand_logprob(llm, p, a) for a in answers] for p in prompts])
    assert got.shape == (3, 4)
    assert torch.allclose(got, want, atol=1e-4)
    # normalised over the labels, they are a distribution: the teacher's soft labels
    assert torch.allclose(got.log_softmax(-1).exp().sum(-1), torch.ones(3))


def test_the_prompt_is_the_user_turn_of_the_chat_template_after_the_shots(tmp_path, chat_tokenizer,  # noqa: F811
                                                                      llm_dir, encoder_dir):
    cfg = load_config(recipe(tmp_path, llm_dir, encoder_dir, llm={"prompt": "Topic of: {text}? One of {labels}.",
                                                                    "shots": 1}))
    answers = ["sports", "technology news", "politics"]
    prompts, answer_ids = llm_inputs(cfg, chat_tokenizer, ["goal <|im_start|> match"], [("vote law", 2)], answers)
    rendered = chat_tokenizer.decode(prompts[0])
    labels = "sports, technology news, politics"
    assert rendered == (f"<|im_start|>user\nTopic of: vote law? One of {labels}.<|im_end|>\n"
                        "<|im_start|>assistant\npolitics<|im_end|>\n"
                        f"<|im_start|>user\nTopic of: goal <|im_start|> match? One of {labels}.<|im_end|>\n"
                        "<|im_start|>assistant\n")
    start = chat_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert prompts[0].count(start) == 4  # the template's turns only: the text's "<|im_start|>" stays text
    assert answer_ids == [chat_tokenizer("sports", add_special_tokens=False)["input_ids"],
                          chat_tokenizer("technology news", add_special_tokens=False)["input_ids"],
                          chat_tokenizer("politics", add_special_tokens=False)["input_ids"]]
    assert len(answer_ids[1]) > 1  # a multi-token answer


def test_scores_are_stored_once_and_a_killed_pass_resumes_where_it_stopped(tmp_path, llm, monkeypatch):
    monkeypatch.setattr(label_scores, "SHARD_TEXTS", 4)
    prompts = [[3 + i % 5, 8, 9 + i % 7][: 2 + i % 2] for i in range(10)]
    answers = [[21], [30, 31]]
    whole, info = llm_label_scores(llm, prompts, answers, pad_id=0, batch_size=4, root=tmp_path / "a")
    assert (info["calls"], info["reused"], info["forwards_per_text"]) == (10, 0, 2)
    assert info["cpu_s_per_1000_texts"] > 0 and info["wall_s_per_1000_texts"] > 0
    again, info = llm_label_scores(llm, prompts, answers, pad_id=0, batch_size=4, root=tmp_path / "a")
    assert (info["calls"], info["reused"]) == (0, 10) and torch.equal(again, whole)
    assert info["cpu_s_per_1000_texts"] > 0  # what they cost when scored, read back with them

    scored = []
    real = label_scores.answer_logprobs

    def killed_after_one_shard(model, batch, *args, **kwargs):
        if scored:
            raise KeyboardInterrupt  # a kill while the second shard is scored
        scored.append(len(batch))
        return real(model, batch, *args, **kwargs)

    monkeypatch.setattr(label_scores, "answer_logprobs", killed_after_one_shard)
    with pytest.raises(KeyboardInterrupt):
        llm_label_scores(llm, prompts, answers, pad_id=0, batch_size=4, root=tmp_path / "b")
    monkeypatch.setattr(label_scores, "answer_logprobs", real)
    resumed, info = llm_label_scores(llm, prompts, answers, pad_id=0, batch_size=4, root=tmp_path / "b")
    assert (info["calls"], info["reused"]) == (6, 4)  # the stored prefix is read, only the rest is scored
    assert torch.equal(resumed, whole)


def test_batch_calibration_takes_out_the_label_prior_of_the_training_texts():
    """An LLM that leans to label 0 for every text: raw, it predicts 0 for both test texts; less the mean
    log-probability of each label over the training texts, each test text gets the label its own evidence favours."""
    p = torch.tensor
    scores = {"train": p([[0.8, 0.15, 0.05], [0.7, 0.25, 0.05], [0.7, 0.05, 0.25]]).log(),  # (N, C)
              "test": p([[0.6, 0.35, 0.05], [0.6, 0.05, 0.35]]).log()}
    raw, none = calibrated(scores, "none")
    assert none is None and raw["test"].argmax(-1).tolist() == [0, 0]
    assert torch.allclose(raw["test"].exp().sum(-1), torch.ones(2))
    out, prior = calibrated(scores, "batch")
    want_prior = raw["train"].mean(0)
    assert prior == pytest.approx(want_prior.tolist())
    assert torch.allclose(out["test"], raw["test"] - want_prior)
    assert out["test"].argmax(-1).tolist() == [1, 2]
    assert torch.allclose(out["train"].mean(0), torch.zeros(3), atol=1e-6)  # no label favoured on average


def recipe(tmp_path, llm_dir, encoder_dir, llm: dict | None = None, **sections):
    data = write_toy_csv(tmp_path / "toy.csv", n=60, seed=3)
    return write_recipe(tmp_path / "llm.yaml", {
        "name": "llm-teacher",
        "data": {"train_file": str(data), "max_length": 16, "labeled_limit": 12},
        "teacher": {"llm": {"model": str(llm_dir), "verbalizers": {"sport": "sport", "tech": "tech news",
                                                                   "politics": "politics"}, **(llm or {})}},
        "student": {"model": str(encoder_dir)},
        "distill": {"losses": {"kd": 1.0, "ce": 0.5}, "baseline": True},
        "train": {"max_steps": 3, "batch_size": 8, "lr": 1e-3, "warmup_ratio": 0.0},
        "eval": {"repeats": 1, "warmup": 0},
        "export": {"formats": []},
        **sections})


def test_a_run_learns_the_llm_scores_reports_its_accuracy_and_cost_and_reuses_them(tmp_path, llm_dir, encoder_dir,
                                                                                   chat_tokenizer,  # noqa: F811
                                                                                   monkeypatch):
    monkeypatch.setenv("KDISTILL_CACHE_DIR", str(tmp_path / "cache"))
    cfg = load_config(recipe(tmp_path, llm_dir, encoder_dir))
    run_dir = run(cfg, tmp_path / "run")
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    assert set(metrics["models"]) == {"student", "baseline"}
    llm = metrics["llm_teacher"]
    sizes = metrics["data"]["sizes"]
    assert llm["texts_scored"] == sizes["train"] + sizes["validation"] + sizes["test"]
    assert (llm["calls"], llm["reused"]) == (llm["texts_scored"], 0)
    assert 0.0 <= llm["accuracy"] <= 1.0 and 0.0 <= llm["macro_f1"] <= 1.0 and llm["n_test"] == sizes["test"]
    answers = [chat_tokenizer(a, add_special_tokens=False)["input_ids"] for a in ("politics", "sport", "tech news")]
    assert llm["answer_tokens"] == [len(a) for a in answers] and max(llm["answer_tokens"]) > 1
    assert llm["forwards_per_text"] == len({tuple(a[:-1]) for a in answers})  # one per distinct answer prefix
    assert llm["cpu_s_per_1000_texts"] > 0 and llm["student_cpu_s_per_1000_texts"] > 0
    assert llm["cpu_cost_ratio"] == pytest.approx(llm["cpu_s_per_1000_texts"] / llm["student_cpu_s_per_1000_texts"])
    assert llm["calibration"] == "batch" and 0.0 <= llm["raw_accuracy"] <= 1.0
    assert sorted(llm["label_prior"]) == ["politics", "sport", "tech"]
    student = metrics["models"]["student"]
    assert student["accuracy_retained_pct"] == pytest.approx(100 * student["accuracy"] / llm["accuracy"]) \
        if llm["accuracy"] else student["accuracy_retained_pct"] is None
    assert metrics["data"]["unlabeled_train"] == sizes["train"] - 12  # transfer rows: kd alone reads them
    history = json.loads((run_dir / "logs" / "history_student.json").read_text(encoding="utf-8"))
    assert all("kd" in step for step in history["steps"])
    report = (run_dir / "report.md").read_text(encoding="utf-8")
    assert "## The LLM teacher" in report and "cost per 1,000 texts" in report

    # another seed: the same texts, prompt and LLM; its scores are read back, the LLM scores nothing
    rerun = run(load_config(recipe(tmp_path, llm_dir, encoder_dir), ["train.seed=7"]), tmp_path / "run-seed7")
    again = json.loads((rerun / "metrics.json").read_text(encoding="utf-8"))["llm_teacher"]
    assert (again["calls"], again["reused"]) == (0, llm["texts_scored"])
    assert again["accuracy"] == llm["accuracy"] and again["cpu_s_per_1000_texts"] == llm["cpu_s_per_1000_texts"]


@pytest.mark.parametrize("change, message", [
    ({"teacher": {"llm": {"model": "x", "prompt": "no text here"}}}, "teacher.llm.prompt: .*holds no {text}"),
    ({"teacher": {"llm": {"model": "x", "prompt": "{text} {label}"}}}, "teacher.llm.prompt: {label} is not a field"),
    ({"teacher": {"llm": {"model": "x", "verbalizers": {"a": "yes", "b": "yes"}}}}, "two labels have the answer"),
    ({"teacher": {"llm": {"model": "x"}, "model": "minilm-l6"}}, "teacher.model: the teacher is teacher.llm"),
    ({"student": {"model": None}}, "student.model: with teacher.llm the student is a given pretrained encoder"),
    ({"student": {"model": "minilm-l6", "layers": 2}}, "student.layers: with teacher.llm"),
    ({"distill": {"losses": {"kd": 1.0, "hidden_mse": 1.0}}}, "distill.losses.hidden_mse: an LLM teacher gives"),
    ({"distill": {"losses": {"kd": 1.0}, "strategy": "mutual"}}, "distill.strategy: an LLM teacher is frozen"),
    ({"task": "token-classification"}, "teacher.llm: an LLM teaches classification"),
    ({"student": {"model": "minilm-l6", "from_scratch": {"hidden_size": 32, "num_attention_heads": 2}}},
     "student.from_scratch: the student is student.model or trained from scratch, not both"),
    ({"teacher": {"llm": None, "model": "minilm-l6"}, "student": {"model": None, "from_scratch": {}}},
     "student.from_scratch: only with teacher.llm"),
])
def test_config_errors_name_the_key_in_one_line(tmp_path, change, message, capsys):
    base = {"name": "x", "teacher": {"llm": {"model": "qwen2.5-coder-0.5b"}}, "student": {"model": "minilm-l6"},
            "distill": {"losses": {"kd": 1.0, "ce": 1.0}}}
    for section, value in change.items():
        base[section] = value if not isinstance(value, dict) else {**base.get(section, {}), **value}
    path = write_recipe(tmp_path / "bad.yaml", base)
    with pytest.raises(ConfigError, match=message) as error:
        load_config(path)
    assert "\n" not in str(error.value)
    with pytest.raises(SystemExit) as exit_:
        main(["validate", str(path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdistill: ") and "\n" not in err


def test_a_student_from_scratch_gets_a_wordpiece_of_the_training_texts_and_learns_the_llm_scores(
        tmp_path, llm_dir, encoder_dir, monkeypatch):
    monkeypatch.setenv("KDISTILL_CACHE_DIR", str(tmp_path / "cache"))
    scratch = {"tokenizer": "wordpiece", "vocab_size": 200, "hidden_size": 32, "num_hidden_layers": 1,
               "num_attention_heads": 2, "intermediate_size": 64}
    cfg = load_config(recipe(tmp_path, llm_dir, encoder_dir, student={"model": None, "from_scratch": scratch}))
    run_dir = run(cfg, tmp_path / "run")
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    assert set(metrics["models"]) == {"student", "baseline"} and metrics["llm_teacher"]["cpu_cost_ratio"] > 0
    student, tokenizer, _ = load_model_dir(run_dir / "student")
    assert (student.config.num_hidden_layers, student.config.hidden_size) == (1, 32)
    assert student.config.vocab_size == len(tokenizer) <= 200
    # the vocabulary is the training texts' own: their words read without [UNK]
    train_words = " ".join(load_data(cfg.data).splits["train"]["text"]).split()
    assert tokenizer.unk_token_id not in tokenizer(" ".join(train_words[:50]))["input_ids"]
    history = json.loads((run_dir / "logs" / "history_student.json").read_text(encoding="utf-8"))
    assert all("kd" in step for step in history["steps"])
    # the config the run wrote loads back to the same student
    assert load_config(run_dir / "config.yaml").student.from_scratch == cfg.student.from_scratch


def test_verbalizers_follow_the_labels_and_must_name_every_one_of_them(tmp_path, llm_dir, encoder_dir):
    cfg = load_config(recipe(tmp_path, llm_dir, encoder_dir))
    assert verbalizers(cfg, ["politics", "sport", "tech"]) == ["politics", "sport", "tech news"]
    cfg.teacher.llm.verbalizers = None
    assert verbalizers(cfg, ["politics", "sport", "tech"]) == ["politics", "sport", "tech"]  # the label names
    cfg.teacher.llm.verbalizers = {"sport": "sport", "weather": "weather"}
    with pytest.raises(UserError, match="teacher.llm.verbalizers: 'weather' is not a label of the data"):
        verbalizers(cfg, ["politics", "sport", "tech"])
    cfg.teacher.llm.verbalizers = {"sport": "sport"}
    with pytest.raises(UserError, match="teacher.llm.verbalizers: no answer for label 'politics'"):
        verbalizers(cfg, ["politics", "sport", "tech"])


def test_train_teacher_refuses_an_llm_teacher_in_one_line(tmp_path, llm_dir, encoder_dir, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train-teacher", str(recipe(tmp_path, llm_dir, encoder_dir)), "--out", str(tmp_path / "run")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdistill: teacher.llm: ") and "\n" not in err and not (tmp_path / "run").exists()
