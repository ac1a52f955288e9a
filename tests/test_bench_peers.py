"""benchmarks/peers: the data every peer reads is kdistill's split, row for row; the tables' summaries load as the
results page loads them; the command line; a worker that fails or runs out of time becomes a `failed: <one line>`
row, not a crash; the speed protocol's counts. The instruction table (trl): its rows are the training data of a tiny
kdistill run, its models the ones that run starts from, its count of learned tokens the run's, its scoring the run's
own. No venv is built: the workers here are small scripts run by this interpreter, and the only training is the tiny
kdistill run."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from benchmarks.peers import run as peers_run
from benchmarks.peers.common import (
    Peer,
    PeerFailed,
    SpeedTarget,
    export_data,
    measure_speed,
    run_worker,
)
from benchmarks.peers.timing import read_jsonl, time_texts
from benchmarks.render_results import RESULTS_DIR, load_results
from kdistill.config import load_config
from kdistill.data import UNLABELED, load_data
from tests.conftest import make_toy_examples
from tests import test_instruction
from tests.test_instruction import instruction_recipe

HERE = Path(peers_run.__file__).resolve().parent
chat_tokenizer = test_instruction.chat_tokenizer
"""The tiny chat tokenizer of the instruction tests (a module-scoped fixture), for the tiny instruction run."""


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def worker_script(tmp_path: Path, body: str) -> str:
    """A worker speaking the harness's protocol (timing.main), whose train job runs `body`; its absolute path."""
    script = tmp_path / "worker_fake.py"
    script.write_text(f"import sys, time\nsys.path.insert(0, {str(HERE)!r})\nfrom timing import main\n\n"
                      f"def train(job):\n{body}\n\nmain({{'train': train, 'speed': train}})\n", encoding="utf-8")
    return str(script)


# ------------------------------------------------------------------------------------------------------- data

def test_export_writes_kdistills_split_row_for_row(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", make_toy_examples(90, seed=3))
    extra = write_jsonl(tmp_path / "extra.jsonl", [{"text": f"unlabeled text number {i}"} for i in range(7)])
    cfg = load_config("default", [f"data.train_file={train}", f"data.unlabeled_file={extra}",
                                  "data.labeled_limit=10"])
    data = load_data(cfg.data)
    out = export_data(data, tmp_path / "export")

    for split in ("train", "validation", "test"):
        rows = read_jsonl(out / f"{split}.jsonl")
        assert [r["text"] for r in rows] == list(data.splits[split]["text"]), split
        assert [r["label"] for r in rows] == [None if y == UNLABELED else data.label_names[y]
                                              for y in data.splits[split]["label"]], split
    train_labels = [r["label"] for r in read_jsonl(out / "train.jsonl")]
    assert all(train_labels[:10]) and not any(train_labels[10:])  # data.labeled_limit: the first 10 keep theirs
    assert [r["text"] for r in read_jsonl(out / "unlabeled.jsonl")] == [r["text"] for r in data.unlabeled]
    manifest = json.loads((out / "data.json").read_text(encoding="utf-8"))
    assert manifest["label_names"] == data.label_names == ["politics", "sport", "tech"]
    assert manifest["sizes"] == {s: len(data.splits[s]) for s in ("train", "validation", "test")}


# ---------------------------------------------------------------------------------------------------- outputs

def peers_doc(table_id: str, models: dict) -> dict:
    """A peers.json as run.peers_json writes it, with made-up numbers (never written outside tmp_path)."""
    return {
        "table": table_id, "recipe": "default", "task": "classification", "quick": True,
        "command": "python -m benchmarks.peers.run --quick", "commit": "abc1234", "date": "2026-01-01",
        "data": {"source": "bbc-news", "sizes": {"train": 48, "validation": 48, "test": 48}, "unlabeled_train": 32,
                 "unlabeled_file_rows": 0},
        "budget": {"epochs": 1.0, "batch_size": 16, "lr": 1e-4, "max_length": 128, "temperature": 2.0,
                   "losses": {"kd": 1.0, "ce": 0.5}},
        "speed": {"rounds": 1, "warmup": 1, "repeats": 3, "throughput_batch_size": 8, "threads": 1},
        "models": models,
    }


def test_summaries_load_as_the_results_page_loads_them(tmp_path):
    args = peers_run.parse_args(["--quick", "--out", str(tmp_path)])
    speed = {"latency_ms_batch1": 12.5, "throughput_per_s": 80.0, "throughput_batch_size": 8, "threads": 1}
    models = {
        "kdistill:student": {"system": "kdistill", "label": "kdistill student", "accuracy": 0.9, "macro_f1": 0.89,
                             "samples_per_s": 20.0, "train_wall_time_s": 75.0, "size_mb": 60.3, **speed},
        "hf-trainer-kd": {"system": "hf-trainer-kd", "label": "Trainer subclass", "accuracy": 0.85,
                          "samples_per_s": 9.0, "train_wall_time_s": 5.6, "size_mb": 60.3,
                          "speed_failed": "worker_hf_trainer_kd.py: OSError: gone (exit 1)"},
        "textbrewer": {"system": "textbrewer", "label": "TextBrewer", "failed": "worker_textbrewer.py: timed out"},
    }
    for table in [t for t in peers_run.TABLES.values() if t.recipe in ("default", "embedding")]:
        summary = peers_run.summary(table, peers_doc(table.id, models), args)
        (tmp_path / f"{table.id}.json").write_text(json.dumps(summary), encoding="utf-8")

    results = {r["id"]: r for r in load_results(tmp_path)}
    assert list(results) == ["peers-embedding", "peers-fewlabel", "peers-kd"]  # by order
    kd = results["peers-kd"]
    assert kd["rows"][0] == ["kdistill student", "90.00%", "20.0", "1 min 15 s", "12.50 ms", "80.0/s", "60.3 MiB"]
    assert kd["rows"][1][4:6] == ["timing failed", "–"]
    assert kd["rows"][2] == ["TextBrewer", "failed: worker_textbrewer.py: timed out", "–", "–", "–", "–", "–"]
    assert "quick smoke run" in kd["title"]
    assert any("worker_hf_trainer_kd.py: OSError: gone" in note for note in kd["notes"])
    assert all(len(row) == len(r["columns"]) for r in results.values() for row in r["rows"])


# ------------------------------------------------------------------------------------------------ command line

def test_command_line_defaults_and_quick():
    full = peers_run.parse_args([])
    assert full.peers == list(peers_run.PEERS) and full.threads == 2 and full.speed_rounds == 3
    assert full.results_dir == RESULTS_DIR and full.out.name == "peers"
    quick = peers_run.parse_args(["--quick", "--peers", "model2vec", "setfit", "--threads", "1"])
    assert quick.peers == ["model2vec", "setfit"] and quick.speed_rounds == 1
    assert quick.out.name == "peers-quick" and quick.results_dir == quick.out / "results"


def test_recipe_overrides_go_to_their_recipe_only():
    args = peers_run.parse_args(["--quick", "--threads", "1", "--set", "embedding:teacher.model=mpnet-base"])
    embedding = peers_run.kdistill_overrides("embedding", args)
    assert embedding[-1] == "teacher.model=mpnet-base" and "train.num_threads=1" in embedding
    assert "data.limit=48" in embedding
    assert not any("mpnet" in item for item in peers_run.kdistill_overrides("default", args))
    assert load_config("embedding", embedding).teacher.model == "mpnet-base"


@pytest.mark.parametrize("argv", [
    ["--quick", "--results-dir", str(RESULTS_DIR)],  # smoke-run numbers never go into docs/results
    ["--peers", "nope"],
    ["--set", "teacher.model=x"],
    ["--set", "lm:teacher.model=x"],
    ["--threads", "0"],
])
def test_command_line_refuses(argv, capsys):
    with pytest.raises(SystemExit) as e:
        peers_run.parse_args(argv)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("python -m benchmarks.peers.run: error:")


# ------------------------------------------------------------------------------------------------- subprocesses

def test_worker_result_comes_back(tmp_path):
    worker = worker_script(tmp_path, "    return {'got': job['x'], 'threads': job['threads']}")
    result = run_worker(Path(sys.executable), worker, {"mode": "train", "x": 7}, tmp_path / "w", timeout_s=60,
                        threads=1)
    assert result == {"got": 7, "threads": 1}


def test_failing_worker_is_one_line(tmp_path):
    worker = worker_script(tmp_path, "    raise ValueError('no such\\nfile: model.safetensors')")
    with pytest.raises(PeerFailed) as e:
        run_worker(Path(sys.executable), worker, {"mode": "train"}, tmp_path / "w", timeout_s=60, threads=1)
    assert str(e.value) == f"{worker}: ValueError: no such file: model.safetensors (exit 1)"
    assert "Traceback" in (tmp_path / "w" / "train.log").read_text(encoding="utf-8")  # the whole story in the log


def test_worker_past_its_time_is_killed(tmp_path):
    worker = worker_script(tmp_path, "    time.sleep(60)")
    started = time.monotonic()
    with pytest.raises(PeerFailed, match=r"timed out after 1 s$"):
        run_worker(Path(sys.executable), worker, {"mode": "train"}, tmp_path / "w", timeout_s=1, threads=1)
    assert time.monotonic() - started < 30


def test_a_failing_peer_becomes_a_failed_row(tmp_path, monkeypatch):
    monkeypatch.setattr(peers_run, "ensure_venv", lambda *a: Path(sys.executable))  # no venv built
    worker = worker_script(tmp_path, "    raise RuntimeError('out of memory')")
    peer = Peer(name="fake", table="peers-kd", packages=(), worker=worker, job=lambda setup: {},
                systems=lambda *a: pytest.fail("a failed worker's outputs are not read"), timeout_s=60, note="")
    setup = SimpleNamespace(work=tmp_path, quick=True)
    args = peers_run.parse_args(["--quick", "--threads", "1", "--out", str(tmp_path)])

    systems, python = peers_run.run_peer(peer, setup, args)

    assert python is None
    numbers, model_dir = systems["fake"]
    assert numbers == {"failed": f"{worker}: RuntimeError: out of memory (exit 1)"} and model_dir is None
    row = peers_run.table_row(peers_run.TABLES["peers-kd"], {"system": "fake", **numbers})
    assert row[:2] == ["fake", f"failed: {worker}: RuntimeError: out of memory (exit 1)"]
    assert row[2:] == ["–"] * (len(peers_run.TABLES["peers-kd"].columns) - 2)


def test_speed_rounds_pool_timings_and_record_a_failure(tmp_path):
    texts = write_jsonl(tmp_path / "texts.jsonl", [{"text": "a b"}])
    ok = worker_script(tmp_path, "    return {'single_s': [0.01, 0.03], 'batch_s': [0.5]}")
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    bad = worker_script(bad_dir, "    raise OSError('model dir gone')")
    targets = {"a": SpeedTarget(Path(sys.executable), ok, tmp_path), "b": SpeedTarget(Path(sys.executable), bad,
                                                                                     tmp_path)}
    speed = measure_speed(targets, texts, tmp_path / "speed", rounds=2, batch_size=8, warmup=1, repeats=2,
                          max_length=16, threads=1, timeout_s=60)
    assert speed["a"]["latency_ms_batch1"] == pytest.approx(20.0)  # median of 10, 30, 10, 30 ms
    assert speed["a"]["throughput_per_s"] == pytest.approx(16.0) and speed["a"]["speed_rounds"] == 2
    assert speed["b"] == {"speed_failed": f"{bad}: OSError: model dir gone (exit 1)"}


def test_time_texts_counts():
    calls = []
    out = time_texts(calls.append, ["x", "y", "z"], batch_size=4, warmup=2, repeats=5)
    assert len(out["single_s"]) == 5 and len(out["batch_s"]) == 3  # max(3, 5 // 4) timed batches
    assert calls[:7] == [["x"], ["y"], ["z"], ["x"], ["y"], ["z"], ["x"]]
    assert calls[7:] == [["x", "y", "z", "x"], ["y", "z", "x", "y"], ["z", "x", "y", "z"], ["x", "y", "z", "x"]]


# ----------------------------------------------------------------------------------------- instruction (trl)
# A tiny instruction run (tests/test_instruction.py's chat rows and GPT-2 with a ChatML template), counted as the
# harness counts it, then prepared for TRL as the harness prepares it; nothing runs in TRL's venv.

@pytest.fixture(scope="module")
def instruction_run(tmp_path_factory, chat_tokenizer):
    from benchmarks.peers import trl_peer
    from kdistill.pipeline import run

    tmp = tmp_path_factory.mktemp("instruct")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KDISTILL_CACHE_DIR", str(tmp / "cache"))
        recipe = instruction_recipe(tmp, chat_tokenizer, distill={"losses": {"jsd": 1.0}, "temperature": 1.0,
                                                                   "baseline": False},
                                    train={"max_steps": 3, "batch_size": 8, "grad_accum": 2, "lr": 1e-3,
                                           "eval_every": 2, "checkpoint_every": 2})
        cfg = load_config(recipe, ["student.layers=1", "train.num_threads=1", "eval.num_threads=1"])
        work = tmp / "work"
        work.mkdir()
        with trl_peer.counting(work / trl_peer.TOKENS_FILE):
            run_dir = run(cfg, work / "kdistill")
        setup = trl_peer.prepare("instruct", cfg, run_dir, work, quick=True, threads=1)
        yield SimpleNamespace(cfg=cfg, run_dir=run_dir, work=work, setup=setup)


def rebuilt_rows(setup):
    """kdistill's training rows as its run built them, read back by kdistill's loaders (the teacher reloaded from
    the dir the harness saved: the same weights, so the same stored responses)."""
    from kdistill.models import load_causal_lm, load_tokenizer
    from kdistill.tasks.instruction import Reader, training_rows

    teacher = load_causal_lm(str(setup.teacher_dir)).eval()
    reader = Reader.of(load_tokenizer(str(setup.teacher_dir)))
    return training_rows(setup.cfg, setup.data, teacher, reader)[:2], reader


def test_instruction_export_is_the_runs_training_data(instruction_run):
    from benchmarks.peers import trl_peer
    from kdistill.errors import UserError

    setup = instruction_run.setup
    (examples, responses), _ = rebuilt_rows(setup)
    data = setup.data
    assert len(data.gold) == 8 and len(examples) == len(data.gold) + len(data.transfer)  # every transfer answered
    assert [e.response for e in data.gold] == responses[:8]
    rows = read_jsonl(setup.data_dir / "train.jsonl")
    assert [r["messages"] for r in rows] == [[*e.prompt, {"role": "assistant", "content": r}]
                                             for e, r in zip(examples, responses)]
    assert all(r["messages"][-1]["content"] for r in rows)
    test = read_jsonl(setup.data_dir / "test.jsonl")
    assert [r["messages"] for r in test] == [list(e.prompt) for e in data.splits["test"]]
    assert [r["answer"] for r in test] == [e.fields["answer"] for e in data.splits["test"]]
    summary = json.loads((setup.data_dir / "data.json").read_text(encoding="utf-8"))
    assert summary["train_rows"] == len(rows) and summary["answered_by_teacher"] == len(rows) - 8

    trl_peer.check_rows(setup.cfg, data, examples, responses, instruction_run.run_dir)  # the run's fingerprint
    with pytest.raises(UserError, match="not the ones the run trained on"):
        trl_peer.check_rows(setup.cfg, data, examples, responses[:-1] + [responses[-1] + " more"],
                            instruction_run.run_dir)


def test_trl_starts_from_kdistills_untrained_student_and_teacher(instruction_run):
    from safetensors.torch import load_file

    from benchmarks.peers import trl_peer

    setup = instruction_run.setup
    metrics = json.loads((instruction_run.run_dir / "metrics.json").read_text(encoding="utf-8"))
    init = load_file(setup.student_dir / "model.safetensors")
    assert sum(t.numel() for t in init.values()) == metrics["models"]["untrained"]["params"]
    teacher = load_file(setup.teacher_dir / "model.safetensors")
    source = load_file(Path(instruction_run.cfg.teacher.model) / "model.safetensors")
    assert teacher.keys() == source.keys() and all(torch.equal(teacher[k], source[k]) for k in source)
    # the student's one layer is the teacher's layer it was cut from (kdistill's init), and its embeddings too
    layer = setup.student_layers
    assert len(layer) == 1
    assert torch.equal(init["transformer.h.0.attn.c_attn.weight"],
                       source[f"transformer.h.{layer[0]}.attn.c_attn.weight"])
    assert torch.equal(init["transformer.wte.weight"], source["transformer.wte.weight"])

    job = trl_peer.job(setup)
    b = job["budget"]
    assert (b["steps"], b["batch_size"], b["grad_accum"], b["lr"], b["beta"], b["lmbda"]) == (3, 8, 2, 1e-3, 0.5, 0.0)
    assert (b["max_prompt_tokens"], b["max_response_tokens"], b["warmup_steps"]) == (40, 6, 0)
    assert set(job["stop_ids"]) == {token_id("<|im_end|>", setup), token_id("<|endoftext|>", setup)}


def token_id(token: str, setup) -> int:
    from kdistill.models import load_tokenizer

    return load_tokenizer(str(setup.student_dir)).convert_tokens_to_ids(token)


def test_counted_tokens_are_the_targets_each_step_learned(instruction_run):
    """The count made while kdistill trained equals the next-token targets of the micro-batches its loader gave the
    3 steps (2 each; no on-policy step here: the data's own batches, replayed)."""
    from benchmarks.peers import trl_peer
    from kdistill.strategies.causal import make_block_loader, with_targets
    from kdistill.training import GroupStream

    setup, cfg = instruction_run.setup, instruction_run.cfg
    (examples, responses), reader = rebuilt_rows(setup)
    blocks = reader.blocks(examples, responses, cfg.data, "train")
    stream = GroupStream(make_block_loader(blocks, 4, seed=cfg.train.seed), 2, device="cpu")
    groups = [group for _, group in zip(range(3), stream)]
    replayed = sum(int(with_targets(b)["valid"].sum()) for group in groups for b in group)

    counted = json.loads((instruction_run.work / trl_peer.TOKENS_FILE).read_text(encoding="utf-8"))
    assert counted[trl_peer.PHASE]["targets"] == replayed > 0
    assert (counted[trl_peer.PHASE]["steps"], counted[trl_peer.PHASE]["batches"]) == (3, 6)
    assert counted[trl_peer.PHASE]["validation_s"] > 0 and counted[trl_peer.PHASE]["checkpoint_s"] > 0

    rows = trl_peer.kdistill_systems(setup, {"teacher", "untrained", "student"})
    student = rows["kdistill:student"][0]
    assert (student["targets"], student["steps"], student["batches"], student["on_policy_batches"]) == (replayed, 3,
                                                                                                      6, 0)
    aside = student["validation_s"] + student["checkpoint_s"]
    assert student["tokens_per_s"] == pytest.approx(replayed / (student["train_wall_time_s"] - aside))
    assert rows["kdistill:untrained"][1] == setup.student_dir and "targets" not in rows["kdistill:teacher"][0]


def test_a_trl_student_is_scored_by_kdistills_own_path(instruction_run):
    """score_model on kdistill's own student gives the numbers its run wrote: one code path scores both."""
    from benchmarks.peers import trl_peer

    metrics = json.loads((instruction_run.run_dir / "metrics.json").read_text(encoding="utf-8"))["models"]
    scored = trl_peer.score_model(instruction_run.setup, instruction_run.run_dir / "student")
    for key in ("task_score", "agreement_with_teacher", "response_tokens", "empty_responses", "params"):
        assert scored[key] == pytest.approx(metrics["student"][key]), key


@pytest.mark.parametrize("overrides, expected", [
    ([], {"beta": 0.5, "lmbda": 0.5}),                                          # the table's own: GKD's setting
    (["distill.losses={forward_kl: 1.0}", "distill.on_policy_fraction=0"], {"beta": 0.0, "lmbda": 0.0}),
    (["distill.losses={reverse_kl: 1.0}", "distill.on_policy_fraction=1"], {"beta": 1.0, "lmbda": 1.0}),
    (["distill.gjsd_beta=0.9"], {"beta": 0.9, "lmbda": 0.5}),
    (["distill.losses={jsd: 1.0, lm: 0.5}"], "distill.losses"),
    (["distill.losses={jsd: 2.0}"], "distill.losses"),
    (["distill.temperature=2.0"], "distill.temperature"),
    (["student.model=smollm2-135m"], "student.model"),
])
def test_gkd_settings_follow_kdistills_recipe(overrides, expected):
    from benchmarks.peers import trl_peer

    cfg = load_config(trl_peer.RECIPE, [*trl_peer.SAME_TOKENIZER, *overrides])
    setup = SimpleNamespace(cfg=cfg)
    if isinstance(expected, dict):
        assert trl_peer.gkd_settings(setup) == expected
    else:
        with pytest.raises(PeerFailed, match=f"^{expected}: "):
            trl_peer.gkd_settings(setup)


def test_instruct_table_runs_the_recipe_with_one_tokenizer():
    args = peers_run.parse_args(["--quick", "--threads", "1", "--peers", "trl", "--set", "instruct:train.lr=1e-4"])
    overrides = peers_run.kdistill_overrides("instruct", args)
    cfg = load_config("instruct", overrides)
    assert cfg.task == "instruction" and cfg.student.model is None and cfg.student.layers == 2  # --quick's 2
    assert (cfg.data.limit, cfg.train.max_steps, cfg.train.lr, cfg.distill.losses) == (8, 2, 1e-4, {"jsd": 1.0})
    full = load_config("instruct", peers_run.kdistill_overrides("instruct", peers_run.parse_args([])))
    assert (full.teacher.model, full.student.layers) == ("smollm2-135m", 12)
    assert [t.id for t in peers_run.TABLES.values() if t.recipe == "instruct"] == ["peers-instruct"]
    assert peers_run.PEERS["trl"].table == "peers-instruct"


def test_instruct_summary_loads_as_the_results_page_loads_it(tmp_path):
    args = peers_run.parse_args(["--quick", "--out", str(tmp_path)])
    table = peers_run.TABLES["peers-instruct"]
    trained = {"targets": 1234, "tokens_per_s": 5.25, "train_wall_time_s": 235.0, "steps": 100, "batches": 400,
               "size_mb": 1720.4}
    doc = {
        "table": table.id, "recipe": "instruct", "task": "instruction", "quick": True, "command": "python -m x",
        "commit": "abc1234", "date": "2026-01-01", "speed": None,
        "data": {"source": "bbc-topics", "sizes": {"train": 200, "validation": 178, "test": 200}, "gold_rows": 32,
                 "transfer_prompts": 168, "train_rows": 199, "answered_by_teacher": 167},
        "budget": {"steps": 100, "planned_steps": 100, "batch_size": 8, "grad_accum": 4, "lr": 5e-5,
                   "warmup_ratio": 0.1, "warmup_steps": 10, "weight_decay": 0.01, "max_grad_norm": 1.0, "seed": 42,
                   "max_prompt_tokens": 160, "max_response_tokens": 8, "temperature": 1.0, "losses": {"jsd": 1.0},
                   "gjsd_beta": 0.5, "on_policy_fraction": 0.5},
        "models": {
            "kdistill:teacher": {"system": "kdistill", "label": "teacher", "task_score": 0.8,
                                 "agreement_with_teacher": 1.0, "size_mb": 2400.0},
            "kdistill:student": {"system": "kdistill", "label": "kdistill student", "task_score": 0.755,
                                 "agreement_with_teacher": 0.9, "on_policy_batches": 192, "validation_s": 12.5,
                                 "checkpoint_s": 30.25,
                                 **trained},
            "trl": {"system": "trl", "label": "TRL GKDTrainer", "task_score": 0.7, "agreement_with_teacher": 0.85,
                    "on_policy_batches": 205, **trained, "tokens_per_s": 4.0},
            "trl-broken": {"system": "trl", "label": "TRL", "failed": "worker_trl.py: timed out"},
        },
    }
    (tmp_path / "peers-instruct.json").write_text(json.dumps(peers_run.summary(table, doc, args)), encoding="utf-8")

    result, = load_results(tmp_path)
    assert result["rows"][0] == ["teacher", "80.00%", "100.00%", "–", "–", "–", "–", "2400.0 MiB"]
    assert result["rows"][1] == ["kdistill student", "75.50%", "90.00%", "1,234", "5.2", "3 min 55 s", "192 of 400",
                                 "1720.4 MiB"]
    assert result["rows"][2][3:7] == ["1,234", "4.0", "3 min 55 s", "205 of 400"]
    assert result["rows"][3][:2] == ["TRL", "failed: worker_trl.py: timed out"]
    notes = " ".join(result["notes"])
    assert "32 gold rows and 167 transfer prompts" in notes and "100 steps of 8 rows (4 micro-batches)" in notes
    assert "12.5 s and 30.2 s" in notes and "GKDTrainer" in notes and "quick smoke run" in result["title"]
