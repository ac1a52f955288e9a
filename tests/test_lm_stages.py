"""Causal-LM parts of the shared stages: the corpus's leakage check and limit (data.py), the one torch-thread helper
and LM speed (evaluate.py), the report's causal-LM page and its single "Student: ..." line (report.py)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from kdistill.config import DataConfig, EvalConfig
from kdistill.data import LMBlocks, load_lm_corpus
from kdistill.errors import DataError
from kdistill.measure import compare_lm_speed, compare_speed, torch_threads
from kdistill.reporting import student_line, write_report
from kdistill.tasks.causal_lm import lm_size_points, lm_size_table


def write_jsonl(path, texts):
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts), encoding="utf-8")
    return str(path)


# ------------------------------------------------------------------------------------------------------ data


def test_held_out_documents_also_in_train_are_counted_and_dropped_or_kept(tmp_path):
    docs = [f"Story {i}: the team won the final match." for i in range(30)]
    test = ["STORY 3:  the team won   the final match.", "A story no one has read."]  # case and spacing differ
    cfg = DataConfig(train_file=write_jsonl(tmp_path / "train.jsonl", docs),
                     validation_file=write_jsonl(tmp_path / "val.jsonl", ["Another story."]),
                     test_file=write_jsonl(tmp_path / "test.jsonl", test))
    dropped = load_lm_corpus(cfg)
    assert sorted(dropped.docs["train"]) == sorted(docs)
    assert dropped.leakage["test_docs_also_in_train"] == 1 and dropped.leakage["validation_docs_also_in_train"] == 0
    assert dropped.docs["test"] == test[1:]
    kept = load_lm_corpus(cfg.model_copy(update={"drop_test_duplicates": False}))
    assert kept.docs["test"] == test and kept.leakage == {**dropped.leakage, "removed": False}
    assert list(dropped.leakage) == ["removed", "validation_docs_also_in_train", "test_docs_also_in_train"]


def test_a_split_left_without_documents_names_it(tmp_path):
    docs = [f"Story {i}: prices rose." for i in range(10)]
    cfg = DataConfig(train_file=write_jsonl(tmp_path / "train.jsonl", docs),
                     validation_file=write_jsonl(tmp_path / "val.jsonl", ["Another story."]),
                     test_file=write_jsonl(tmp_path / "test.jsonl", docs[:2]))  # every test document is in train
    with pytest.raises(DataError, match=r"the test split has no documents; use more data"):
        load_lm_corpus(cfg)


# ------------------------------------------------------------------------------------------------ evaluation


def test_torch_threads_sets_and_always_restores_the_count():
    before = torch.get_num_threads()
    other = 1 if before != 1 else 2
    with pytest.raises(RuntimeError):
        with torch_threads(other) as seen:
            assert seen == before and torch.get_num_threads() == other
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before


class _Unreadable:
    def __len__(self):
        raise RuntimeError("cannot read the split")


def test_compare_speed_restores_the_thread_count_when_preparing_inputs_fails():
    before = torch.get_num_threads()
    cfg = EvalConfig(num_threads=1 if before != 1 else 2)
    with pytest.raises(RuntimeError, match="cannot read the split"):
        compare_speed({"m": torch.nn.Identity()}, {"m": (_Unreadable(), None)}, cfg)
    assert torch.get_num_threads() == before


def tiny_lm(layers: int) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=64, n_embd=16, n_layer=layers, n_head=2,
                                      eos_token_id=0, pad_token_id=0)).eval()


def test_lm_speed_runs_with_the_configured_threads_and_restores_them():
    before = torch.get_num_threads()
    ids = torch.randint(1, 50, (3, 40), generator=torch.Generator().manual_seed(0))
    blocks = LMBlocks(ids, torch.ones_like(ids))
    cfg = EvalConfig(repeats=2, warmup=1, throughput_batch_size=2, num_threads=1)
    out = compare_lm_speed({"a": tiny_lm(2), "b": tiny_lm(1)}, blocks, cfg, pad_id=0)
    assert torch.get_num_threads() == before
    for numbers in out.values():
        assert numbers["threads"] == 1 and numbers["score_batch_size"] == 2
        assert numbers["ms_per_token_batch1"] * numbers["generate_tokens_per_s"] == pytest.approx(1000)


# ---------------------------------------------------------------------------------------------------- report


SHAPE = {"student": {"layers": 2, "hidden": 32, "heads": 2, "ffn": 64},
         "teacher": {"layers": 4, "hidden": 32, "heads": 2, "ffn": 64}, "init": {"layers": [0, 3]}}


def test_student_line_for_a_classifier_and_for_a_causal_lm():
    assert student_line(SHAPE) == ("Student: 2 layers x 32 hidden, 2 heads, FFN 64 (teacher: 4 x 32, 2 heads, "
                                   "FFN 64); init {'layers': [0, 3]}.")
    lm = {**SHAPE, "student_block_params": 1000, "teacher_block_params": 4000, "block_param_ratio": 0.25}
    assert student_line(lm) == ("Student: 2 layers x 32 hidden (teacher: 4 x 32); block parameters 1,000 vs 4,000 "
                                "(25.0%); init {'layers': [0, 3]}.")


def test_causal_lm_report_from_metrics(tmp_path):
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    model = {"perplexity": 12.5, "bits_per_byte": 1.25, "params": 1000, "block_params": 500, "size_mb": 0.1,
             "n_test_tokens": 1234, "n_test_bytes": 5678,
             "generate_tokens_per_s": 100.0, "score_tokens_per_s": 900.0, "speedup_vs_teacher": 1.0,
             "size_ratio_vs_teacher": 1.0, "train_wall_time_s": 3.0}
    samples = {name: [{"prompt": "The coach said", "completion": f" {name}  wins\nagain"}] for name in ("teacher",
                                                                                                    "student")}
    metrics = {"run": "lm", "task": "causal-lm",
               "models": {"teacher": model, "student": {**model, "perplexity": 20, "bits_per_byte": 1.5}},
               "data": {"source": "news.jsonl", "documents": {"test": 7}, "block_size": 32, "tokens": {"test": 99}},
               "student_shape": {**SHAPE, "student_block_params": 1000, "teacher_block_params": 4000,
                                 "block_param_ratio": 0.25},
               "samples": samples, "teacher_cache": None, "machine": {"eval_threads": 2}}
    (run / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    history = {"name": "student", "steps": [{"step": i, "loss": 3.0 / i, "lm": 4.0 / i} for i in (1, 2, 3)],
               "evals": [], "wall_time_s": 3.0}
    (run / "logs" / "history_student.json").write_text(json.dumps(history), encoding="utf-8")
    text = write_report([run]).read_text()
    assert "| student | 20.00 | 1.500 | 1,000 | 500 |" in text
    assert "Held-out perplexity on 1,234 predicted test tokens (5,678 bytes: bits/byte = their NLL / (ln 2 x bytes)) " \
           "(7 documents of news.jsonl" in text
    assert "Generation: greedy, batch 1, 32 new tokens" in text and "CPU, 2 threads" in text
    assert text.count("Student: ") == 1 and student_line(metrics["student_shape"]) in text
    assert "## Sample generations (lm; greedy, 30 new tokens)" in text
    assert "- *student*: student wins again" in text
    assert (run / "plots" / "lm_curves_tradeoff.png").is_file()


def _lm_run(root, name: str, block_params: int, student_ppl: float, baseline_ppl: float, tokens_per_s: float):
    """A finished causal-LM run dir with a teacher (perplexity 10, 90M block params, 10 tok/s), a KD student and
    its no-KD baseline."""
    run = root / name
    (run / "logs").mkdir(parents=True)
    def model(ppl, params, speed):
        return {"perplexity": ppl, "bits_per_byte": ppl / 10, "params": params + 100, "block_params": params,
                "generate_tokens_per_s": speed}
    metrics = {"run": name, "task": "causal-lm",
               "models": {"teacher": model(10.0, 90_000_000, 10.0), "student": model(student_ppl, block_params, tokens_per_s),
                          "baseline": model(baseline_ppl, block_params, tokens_per_s)},
               "data": {"source": "news", "documents": {"test": 2}, "block_size": 8, "tokens": {"test": 50}},
               "machine": {"eval_threads": 1}}
    (run / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    return run


def test_lm_report_over_several_sizes_shows_the_trade_off_per_size(tmp_path):
    runs = [_lm_run(tmp_path, "half-s1", 45_000_000, 20.0, 24.0, 20.0), _lm_run(tmp_path, "two-thirds", 60_000_000, 13.0, 12.0, 15.0),
            _lm_run(tmp_path, "half-s2", 45_000_000, 22.0, 23.0, 22.0)]
    points = lm_size_points([{"metrics": json.loads((r / "metrics.json").read_text())} for r in runs])
    assert [p["block_params"] for p in points] == [45_000_000, 60_000_000] and points[0]["runs"] == ["half-s1", "half-s2"]
    table = lm_size_table(points)
    # half: KD 21 (20-22) / teacher 10 = 2.10x, below no-KD in both runs; speed-up (2 + 2.2) / 2 = 2.10x
    assert "| 45.0M (50%) | 2 | 21.00 (20.00–22.00) | 23.50 (23.00–24.00) | 2.10x | 2/2 | 2.100 (2.000–2.200) | " \
           "2.350 (2.300–2.400) | 2.10x |" in table
    assert "| 60.0M (67%) | 1 | 13.00 | 12.00 | 1.30x | 0/1 |" in table
    text = write_report(runs, tmp_path / "curve").read_text()
    assert "## Trade-off: student size against perplexity and speed" in text and table in text
    assert (tmp_path / "curve" / "plots" / "lm_size_tradeoff.png").is_file()
    assert "## Trade-off" not in write_report(runs[:1]).read_text()  # one run: no curve to draw
