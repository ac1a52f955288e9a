"""benchmarks/peers: the data every peer reads is kdistill's split, row for row; the tables' summaries load as the
results page loads them; the command line; a worker that fails or runs out of time becomes a `failed: <one line>`
row, not a crash; the speed protocol's counts. No venv is built and nothing is trained: the workers here are small
scripts run by this interpreter."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

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

HERE = Path(peers_run.__file__).resolve().parent


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
    for table in peers_run.TABLES.values():
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
