"""Task instruction on tiny models: chat rows in, a teacher's responses stored once, the three ways to learn from
it, task scores of every model, the report; response-only targets."""

from __future__ import annotations

import json
import random
import sys

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from kdistill.config import RunConfig, load_config
from kdistill.data import ChatExample
from kdistill.errors import UserError
from kdistill.pipeline import run
from kdistill.data.chat import with_shots
from tests.conftest import OBJECTS, SUBJECTS, VERBS
from tests.helpers import write_recipe

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        verb = rng.choice(VERBS)
        story = f"{rng.choice(SUBJECTS).capitalize()} {verb} {rng.choice(OBJECTS)}."
        rows.append({"messages": [{"role": "user", "content": f"{story} Which verb? One word."},
                                  {"role": "assistant", "content": verb}], "answer": verb, "labels": VERBS})
    return rows


@pytest.fixture(scope="module")
def chat_tokenizer():
    texts = [m["content"] for r in chat_rows(200) for m in r["messages"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts + ["user\nassistant\nsystem\n"], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
                                        model_max_length=128)
    tokenizer.chat_template = CHATML
    return tokenizer


def chat_model_dir(path, tokenizer, layers: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=layers, n_head=2,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.eos_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def scorer_module(tmp_path, monkeypatch) -> str:
    """A user's scorer as module:function (the verb named as the first word, case-insensitive)."""
    (tmp_path / "my_scores.py").write_text(
        "def first_word(response, fields):\n"
        "    words = response.split()\n"
        "    return float(bool(words) and words[0].strip('.').lower() == fields['answer'])\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_scores", None)
    return "my_scores:first_word"


def instruction_recipe(tmp_path, tokenizer, **sections):
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in chat_rows(60)), encoding="utf-8")
    teacher = chat_model_dir(tmp_path / "teacher", tokenizer)
    return write_recipe(tmp_path / "instruct.yaml", {
        "name": "instruct", "task": "instruction",
        "data": {"train_file": str(data), "labeled_limit": 8, "max_prompt_tokens": 40, "max_response_tokens": 6,
                 "test_fraction": 0.2, "validation_fraction": 0.1},
        "teacher": {"model": str(teacher), **sections.pop("teacher", {})},
        "student": {"layers": 1},
        "train": {"max_steps": 3, "batch_size": 8, "lr": 1e-3},
        "eval": {"scorer": "label", "samples": 2},
        **sections})


def test_the_teacher_answers_after_its_in_context_gold_rows_the_student_without():
    shot = ChatExample(({"role": "user", "content": "Q1"},), "A1", {}, "f:1")
    question = ChatExample(({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q2"}), None,
                           {}, "f:2")
    seen, = with_shots([question], [shot, shot])
    assert [(m["role"], m["content"]) for m in seen.prompt] == [
        ("system", "Be brief."), ("user", "Q1"), ("assistant", "A1"), ("user", "Q1"), ("assistant", "A1"),
        ("user", "Q2")]
    assert with_shots([question], []) == [question]


@pytest.mark.parametrize("sections", [
    {"distill": {"losses": {"lm": 1.0}}},                                   # sequence-level (teacher responses)
    {"distill": {"losses": {"lm": 1.0}}, "teacher": {"shots": 2}},         # ... answered with 2 gold rows in context
    {"distill": {"losses": {"forward_kl": 1.0, "lm": 0.5}, "temperature": 1.0}},   # token-level
    {"distill": {"losses": {"reverse_kl": 1.0}, "temperature": 1.0, "on_policy_fraction": 1.0}},  # on-policy
], ids=["sequence-level", "sequence-level-2-shots", "token-level", "on-policy"])
def test_each_way_of_learning_runs_end_to_end_and_scores_every_model(tmp_path, chat_tokenizer, sections,
                                                                    monkeypatch):
    monkeypatch.setenv("KDISTILL_CACHE_DIR", str(tmp_path / "cache"))
    cfg = load_config(instruction_recipe(tmp_path, chat_tokenizer, **sections))
    run_dir = run(cfg, tmp_path / "run")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["models"]) == {"teacher", "untrained", "student", "baseline"}
    for m in metrics["models"].values():
        assert 0.0 <= m["task_score"] <= 1.0 and 0.0 <= m["agreement_with_teacher"] <= 1.0
    data = metrics["data"]
    assert data["gold_rows"] == 8 and data["transfer_prompts"] == data["sizes"]["train"] - 8
    assert metrics["teacher_responses"]["prompts"] == data["transfer_prompts"]
    # the baseline trains on the gold rows alone for as many steps as the student
    assert metrics["models"]["baseline"]["training"]["steps_run"] == metrics["models"]["student"]["training"][
        "planned_steps"] == 3
    report = (run_dir / "report.md").read_text()
    assert "Distillation" in report and "## Sample responses" in report and "*gold*" in report


def test_the_teachers_responses_are_stored_once_and_reused_across_seeds(tmp_path, chat_tokenizer, monkeypatch):
    monkeypatch.setenv("KDISTILL_CACHE_DIR", str(tmp_path / "cache"))
    recipe = instruction_recipe(tmp_path, chat_tokenizer, distill={"losses": {"lm": 1.0}, "baseline": False})
    first = json.loads((run(load_config(recipe), tmp_path / "a") / "metrics.json").read_text())
    second = json.loads((run(load_config(recipe, ["train.seed=7"]), tmp_path / "b") / "metrics.json").read_text())
    assert first["teacher_responses"]["calls"] == first["data"]["transfer_prompts"] > 0
    assert second["teacher_responses"]["calls"] == 0 and second["teacher_responses"]["reused"]
    assert second["teacher_responses"]["path"] == first["teacher_responses"]["path"]


def test_a_users_scorer_given_as_module_function(tmp_path, chat_tokenizer, monkeypatch):
    monkeypatch.setenv("KDISTILL_CACHE_DIR", str(tmp_path / "cache"))
    spec = scorer_module(tmp_path, monkeypatch)
    recipe = instruction_recipe(tmp_path, chat_tokenizer, distill={"losses": {"lm": 1.0}, "baseline": False})
    metrics = json.loads((run(load_config(recipe, [f"eval.scorer={spec}"]), tmp_path / "run") /
                          "metrics.json").read_text())
    assert metrics["scorer"] == spec and 0.0 <= metrics["models"]["student"]["task_score"] <= 1.0


def test_token_level_terms_refuse_a_student_over_another_tokenizer(tmp_path, chat_tokenizer, bpe_tokenizer):
    other = tmp_path / "other"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(bpe_tokenizer), n_positions=128, n_embd=32, n_layer=1,
                               n_head=2)).save_pretrained(other)
    bpe_tokenizer.chat_template = CHATML
    bpe_tokenizer.save_pretrained(other)
    recipe = instruction_recipe(tmp_path, chat_tokenizer, student={"model": str(other)},
                                distill={"losses": {"forward_kl": 1.0}})
    with pytest.raises(UserError, match="another tokenizer than the teacher.*sequence-level"):
        run(load_config(recipe), tmp_path / "run")


@pytest.mark.parametrize("bad_row, says", [
    ({"messages": [{"role": "system", "content": "be brief"}]}, "user"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}, "robot"),
    ({"prompt": "hi", "completion": "  "}, "empty"),
], ids=["no user turn", "unknown role", "empty response"])
def test_bad_chat_rows_exit_2_with_one_line_naming_file_and_line(tmp_path, chat_tokenizer, bad_row, says, capsys):
    from kdistill.cli import main

    recipe = instruction_recipe(tmp_path, chat_tokenizer)
    rows = chat_rows(60)
    rows[6] = bad_row
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    capsys.readouterr()  # (the test's own model saving)
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(recipe), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    assert "chat.jsonl" in err and "line 7" in err and says in err
    assert not (tmp_path / "run").exists()


def test_a_recipe_naming_no_terms_gets_the_tasks_own():
    data = {"dataset": "bbc-topics"}
    assert RunConfig(task="instruction", data=data).distill.losses == {"lm": 1.0}
    assert RunConfig(task="instruction", data=data, distill={"losses": {"forward_kl": 1.0}}).distill.losses == {
        "forward_kl": 1.0}
    assert RunConfig().distill.losses == {"kd": 1.0, "ce": 0.1, "hidden_mse": 1.0}  # the encoder tasks' default


def test_a_run_killed_mid_on_policy_phase_resumes_to_the_uninterrupted_result(tmp_path, chat_tokenizer,
                                                                            monkeypatch):
    """Killed after on-policy step 3 of the student (checkpoints every 2 steps), `run --resume` continues from step
    2: the student's history (its sampled responses drawn again from the checkpointed generators) and every
    model's task score equal the uninterrupted run's."""
    from kdistill.checkpoint import resume_config
    from kdistill.training import Learner
    from tests.helpers import assert_same_steps, history
    from tests.test_resume import Killed, newest_checkpoint_step

    monkeypatch.setenv("KDISTILL_CACHE_DIR", str(tmp_path / "cache"))
    recipe = instruction_recipe(tmp_path, chat_tokenizer, train={"max_steps": 6, "batch_size": 8, "lr": 1e-3,
                                                                 "checkpoint_every": 2},
                                distill={"losses": {"reverse_kl": 1.0}, "temperature": 1.0,
                                         "on_policy_fraction": 1.0})
    cfg = load_config(recipe)
    reference = run(cfg, tmp_path / "reference")
    original = Learner.step

    def die_mid_student(self, step, *args, **kwargs):
        original(self, step, *args, **kwargs)
        if self.history.name == "student" and step == 3:
            raise Killed

    monkeypatch.setattr(Learner, "step", die_mid_student)
    with pytest.raises(Killed):
        run(cfg, tmp_path / "killed")
    monkeypatch.setattr(Learner, "step", original)
    assert newest_checkpoint_step(tmp_path / "killed", "student") == 2
    resumed = run(resume_config(tmp_path / "killed"), tmp_path / "killed", resume=True)
    steps = history(resumed, "student")["steps"]
    assert [s["on_policy"] for s in steps] == [1.0] * 6
    assert_same_steps(steps, history(reference, "student")["steps"], rel=1e-6)
    scores = [{n: m["task_score"] for n, m in json.loads((d / "metrics.json").read_text())["models"].items()}
              for d in (resumed, reference)]
    assert scores[0] == scores[1]


def test_own_data_without_a_scorer_is_a_config_error_naming_eval_scorer(tmp_path, chat_tokenizer):
    from kdistill.errors import ConfigError

    recipe = instruction_recipe(tmp_path, chat_tokenizer, eval={"samples": 2})
    with pytest.raises(ConfigError, match="eval.scorer: your own data has no built-in scorer"):
        load_config(recipe)


def test_held_out_limit_caps_validation_and_test_not_the_training_prompts(tmp_path):
    from kdistill.config import DataConfig
    from kdistill.data.instructions import load_instruction_data

    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in chat_rows(100)), encoding="utf-8")
    cfg = DataConfig(train_file=str(data), labeled_limit=5, held_out_limit=3, test_fraction=0.2,
                     validation_fraction=0.1)
    loaded = load_instruction_data(cfg)
    assert loaded.summary()["sizes"] == {"train": 72, "validation": 3, "test": 3}
    assert (len(loaded.gold), len(loaded.transfer)) == (5, 67)
    capped = load_instruction_data(cfg.model_copy(update={"limit": 10}))
    assert capped.summary()["sizes"] == {"train": 10, "validation": 3, "test": 3}
    quick = load_instruction_data(cfg.model_copy(update={"limit": 2}))  # a quick run's data.limit caps every split
    assert quick.summary()["sizes"] == {"train": 2, "validation": 2, "test": 2}


def test_held_out_limit_is_a_config_error_for_a_task_without_it():
    with pytest.raises(ValueError, match="data.held_out_limit: caps the held-out splits of instruction, not "
                                         "classification"):
        RunConfig(task="classification", data={"held_out_limit": 10})


@pytest.mark.parametrize("teacher, student, baseline, hint", [
    (0.51, 0.53, 0.93, True),     # the gold answers beat the teacher's: the report says so
    (0.71, 0.60, 0.45, False),    # distillation wins
    (0.95, 0.40, 0.50, False),    # it loses to a stronger teacher's student: no such hint
])
def test_the_verdict_says_when_the_gold_answers_beat_the_teachers(teacher, student, baseline, hint):
    from kdistill.tasks.instruction import verdict

    models = {"teacher": {"task_score": teacher}, "student": {"task_score": student},
              "baseline": {"task_score": baseline}, "untrained": {"task_score": 0.2}}
    line = verdict({"models": models, "losses": {"lm": 1.0}, "on_policy_fraction": 0.0})
    gain = 100 * (student - baseline)
    assert f"Distillation {'wins' if gain > 0 else 'loses'} by {abs(gain):.1f} points (lm 1)." in line
    assert ("The teacher scores below the student fine-tuned on the gold responses" in line) == hint
