"""benchmarks/instruction_kd.py on tiny models: one run per seed, the teacher's responses made by the first and read
back by the next, finished runs read back, the summary and its results table."""

from __future__ import annotations

from benchmarks import instruction_kd
from benchmarks.render_results import load_results
from tests.test_instruction import chat_tokenizer, instruction_recipe  # noqa: F401  (a fixture and its recipe)


def test_seeds_summary_and_table(tmp_path, chat_tokenizer, monkeypatch):  # noqa: F811
    monkeypatch.setenv("KDISTILL_CACHE_DIR", str(tmp_path / "cache"))
    recipe = instruction_recipe(tmp_path, chat_tokenizer)
    table = tmp_path / "results" / "instruct-tiny.json"
    table.parent.mkdir()
    argv = ["--recipe", str(recipe), "--seeds", "1", "2", "--out", str(tmp_path / "runs"), "--table", str(table)]
    line = instruction_kd.main(argv)

    first, second = line["per_seed"]
    assert [first["seed"], second["seed"]] == [1, 2] and not first["read_back"]
    assert first["teacher_pass"]["calls"] == first["data"]["transfer_prompts"] > 0
    assert second["teacher_pass"]["calls"] == 0 and second["teacher_test_calls"] == 0  # read from the store
    kd, nokd = line["student_score"]["values"], line["baseline_score"]["values"]
    assert kd == [first["student_score"], second["student_score"]]
    assert line["kd_above_every_nokd"] == (min(kd) > max(nokd))
    assert line["kd_minus_nokd_points"]["values"] == [100 * (a - b) for a, b in zip(kd, nokd)]

    result, = load_results(table.parent)  # the results page reads it
    assert result["id"] == "instruct-tiny" and len(result["rows"]) == 4
    threads = first["threads"]  # the runs' torch threads, not the reading process's
    assert result["machine"].endswith(f"CPU, {threads} thread{'s' * (threads != 1)}")
    teacher_row = result["rows"][0]
    assert teacher_row[1] == " / ".join(f"{100 * first['teacher_score']:.1f}" for _ in range(2))
    assert "every KD seed above every no-KD seed: " + ("yes" if line["kd_above_every_nokd"] else "no") in \
        " ".join(result["notes"])

    again = instruction_kd.main(argv)  # the same config: both runs read back, not trained again
    assert [r["read_back"] for r in again["per_seed"]] == [True, True]
    assert again["student_score"] == line["student_score"]
    changed = instruction_kd.main([*argv[:4], "--out", str(tmp_path / "runs"), "--set", "train.lr=0.002"])
    assert not changed["per_seed"][0]["read_back"]
