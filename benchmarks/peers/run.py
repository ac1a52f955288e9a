"""kdistill side by side with the tools users pick instead, each on kdistill's own split, teacher and budget.

    python -m benchmarks.peers.run                       # every peer, full size; tables into docs/results/
    python -m benchmarks.peers.run --quick               # tiny sizes, a smoke run (tables under --out, never docs/)
    python -m benchmarks.peers.run --peers model2vec st-distill
    python -m benchmarks.peers.run --set embedding:teacher.model=mpnet-base    # a recipe override, for every system

Tables, one per group of peers:
  peers-embedding  recipe embedding: kdistill's student and no-KD control vs model2vec and sentence-transformers'
                   distillation, all scored against the recipe's teacher
  peers-fewlabel   recipe default (few labels + a transfer set): kdistill vs SetFit and SetFit's distillation
  peers-kd         recipe default: kdistill vs a hand-written Trainer-subclass KD and TextBrewer
  peers-instruct   recipe instruct with one tokenizer (SmolLM2-135M-Instruct and a student cut from it, GKD's jsd,
                   half the batches on-policy; trl_peer.SAME_TOKENIZER): kdistill vs TRL's GKDTrainer, by task score and response
                   tokens learned per second (trl_peer.py's doc)

How: for each recipe a table needs, kdistill runs it (<out>/<recipe>/kdistill; reused while its config.yaml is the
one this command would run), and its data, read by kdistill's own loader, is exported as JSON Lines
(<out>/<recipe>/data, common.export_data). Each peer then runs in its own venv (<kdistill cache>/peers/<peer>-venv,
built on first use: torch==2.13.0 first, then the peer's pinned packages) as a worker process with a time limit
(<out>/<recipe>/<peer>/train.log), and writes a model dir plus its test predictions or its train and test vectors.
This process scores them with kdistill's own functions (measure.quality_metrics, measure.embedding_metrics
against the teacher's vectors by kdistill's embed), so one piece of code computes every system's numbers. A peer
that fails or runs out of time becomes a row `failed: <one line>`; the others go on. Last, every system is timed,
in rounds, each round timing every system once in turn (common.measure_speed), each in its own venv by its own
library's inference call, from raw text to output, with --threads threads: batch-1 latency and batch throughput,
medians after warm-up (the warm-up, repeats and batch size are the recipe's eval settings).

The instruction table differs (trl_peer.py): kdistill's run is counted while it trains (the response tokens each step
learns), its training rows are rebuilt by kdistill's functions, checked against the run's data fingerprint and
exported as chat `messages`, its teacher and untrained student are saved for the worker to load, and every system is
scored by its greedy responses to the test prompts through kdistill's generation and scorer; no speed rounds (both
students have one architecture): its numbers are training throughput, train wall time and task score.

Outputs:
  <out>/<table>/peers.json          per table, for programs (the format below)
  <results-dir>/<table>.json        per table, the results page's summary (format: benchmarks/render_results.py);
                                    then `python -m benchmarks.render_results` rewrites docs/results.md

peers.json, one per table, shaped like a kdistill run's metrics.json so that a report puts its systems beside a
run's models (`kdistill report RUN_DIR --peers <out>/<table>`):
  {"table": "peers-kd", "recipe": "default", "task": "classification", "quick": false,
   "kdistill_run": "<the kdistill run dir>", "command": "...", "commit": "...", "date": "YYYY-MM-DD",
   "machine": {"cpu", "cores", "torch", "torch_threads", "python", "threads"},
   "data": <kdistill's DataBundle.summary(): source, labels, sizes, unlabeled_train, unlabeled_file_rows, ...>,
   "budget": {"epochs", "batch_size", "lr", "warmup_ratio", "weight_decay", "max_grad_norm", "seed", "max_length",
              "temperature", "losses"},
   "speed": {"scope": "text in, output out (tokenization included)", "rounds", "warmup", "repeats",
             "throughput_batch_size", "threads"},
   "units": <metrics.json's units: latency_ms_batch1 ms, throughput_per_s examples/s, size_mb MiB, ...>,
   "models": {"<system>": {"system": "kdistill" or the peer's name, "label": "<what it is>",
                           <the task's quality keys, as in metrics.json>, "train_wall_time_s", "size_mb",
                           "latency_ms_batch1", "throughput_per_s", "throughput_batch_size", "threads", ...},
              "<failed system>": {"system", "label", "failed": "<one line>"}}}
System names: kdistill:teacher, kdistill:student, kdistill:baseline (the no-KD control), kdistill:untrained
(instruction: the student before training), and each peer's own (model2vec, st-distill, setfit, setfit-distilled,
hf-trainer-kd, textbrewer, trl). An instruction table's peers.json has "speed": null, "data" with its gold rows and
transfer prompts, "budget" with steps and GKD's settings, and per system task_score, agreement_with_teacher,
targets (response tokens learned), tokens_per_s, batches and on_policy_batches (trl_peer.UNITS). Quality keys:
classification accuracy, macro_f1, weighted_f1, ..., per_class, confusion_matrix (measure.quality_metrics); embedding
spearman_agreement, recall_at_10, knn_accuracy, knn_k, n_held_out, dim (measure.embedding_metrics). Size: every
file of the model dir (weights, tokenizer, config, head), MiB. A system that trained but could not be timed has
"speed_failed": "<one line>" instead of the speed keys. Peers also record steps, examples, samples_per_s (training
examples x epochs / train wall time) and their packages' versions where they have them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from benchmarks._common import stdout_to_stderr
from benchmarks.peers import hf_trainer_kd, model2vec_peer, setfit_peer, st_distill, textbrewer_peer, trl_peer
from benchmarks.peers.common import (
    ROOT,
    PeerFailed,
    Setup,
    SpeedTarget,
    budget,
    disk_mb,
    ensure_venv,
    export_data,
    git_commit,
    machine_line,
    measure_speed,
    run_worker,
)
from benchmarks.render_results import RESULTS_DIR

PEERS = {p.name: p for p in (model2vec_peer.PEER, st_distill.PEER, setfit_peer.PEER, hf_trainer_kd.PEER,
                             textbrewer_peer.PEER, trl_peer.PEER)}
RECIPE_SETS = {trl_peer.RECIPE: trl_peer.SAME_TOKENIZER}
"""Overrides a table's recipe always runs with (before --quick's and the user's)."""
QUICK = {
    "default": ["data.limit=48", "data.labeled_limit=16", "teacher.epochs=1", "train.epochs=1"],
    "embedding": ["data.limit=48", "train.epochs=1", "export.formats=[]"],
    trl_peer.RECIPE: trl_peer.QUICK,
}
"""--quick: the recipes' overrides for a smoke run (every peer follows them: they read the run's config and data)."""
QUICK_EVAL = ["eval.warmup=1", "eval.repeats=3", "eval.throughput_batch_size=8"]
QUICK_TIMEOUT_S = 1200
SPEED_TIMEOUT_S = 900
SPEED_KEYS = ("latency_ms_batch1", "throughput_per_s", "throughput_batch_size", "mean_tokens_per_example",
              "threads", "speedup_vs_teacher")
"""kdistill's own timings in metrics.json (tokens in, tokenization excluded) and what it derives from them: left
out, the harness times every system its own way."""
DASH = "–"


# ------------------------------------------------------------------------------------------------------ tables

def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 60 else f"{int(s // 60)} min {int(s % 60):02d} s"


def fmt(numbers: dict, key: str, show: Callable[[float], str]) -> str:
    value = numbers.get(key)
    return DASH if value is None else show(value)


def speed_cells(n: dict) -> list[str]:
    """Train wall, latency, throughput, size: the columns every table ends with."""
    timed = "timing failed" if "speed_failed" in n else fmt(n, "latency_ms_batch1", lambda x: f"{x:.2f} ms")
    return [fmt(n, "train_wall_time_s", seconds), timed, fmt(n, "throughput_per_s", lambda x: f"{x:.1f}/s"),
            fmt(n, "size_mb", lambda x: f"{x:.1f} MiB")]


@dataclass(frozen=True)
class Table:
    id: str
    order: int
    recipe: str
    title: str
    kdistill_rows: tuple[str, ...]
    """Which of the kdistill run's models are rows (teacher, student, baseline)."""
    columns: tuple[str, ...]
    cells: Callable[[dict], list[str]]
    """A system's numbers -> its cells after the first (the system's label)."""
    about: str
    """The notes' first paragraph: what the table compares."""


TABLES = {t.id: t for t in (
    Table("peers-embedding", 30, "embedding", "Peers: sentence embeddings (model2vec, sentence-transformers)",
          ("teacher", "student", "baseline"),
          ("system", "Spearman vs teacher", "recall@10", "k-NN acc.", "train wall", "latency b=1", "throughput",
           "size on disk"),
          lambda n: [fmt(n, "spearman_agreement", lambda x: f"{x:.4f}"), fmt(n, "recall_at_10", lambda x: f"{x:.3f}"),
                     fmt(n, "knn_accuracy", pct), *speed_cells(n)],
          "kdistill's embedding recipe against the sentence-embedding tools users reach for, every system scored "
          "by kdistill's embedding metrics against the recipe's teacher on the same held-out texts (Spearman ρ of "
          "pairwise cosines, recall@10 of the teacher's neighbours, k-NN accuracy with the training texts as the "
          "index)."),
    Table("peers-fewlabel", 32, "default", "Peers: few labels (SetFit)", ("teacher", "student", "baseline"),
          ("system", "test accuracy", "macro F1", "train wall", "latency b=1", "throughput", "size on disk"),
          lambda n: [fmt(n, "accuracy", pct), fmt(n, "macro_f1", lambda x: f"{x:.4f}"), *speed_cells(n)],
          "kdistill's default recipe (few labels and a transfer set) against SetFit, the tool built for few "
          "labels: SetFit on the same labeled rows, and SetFit's own distillation of that model into the student "
          "kdistill trains, on the same unlabeled rows. Accuracy on the same test split, by kdistill's "
          "quality_metrics."),
    Table("peers-kd", 33, "default", "Peers: classic encoder KD (Trainer subclass, TextBrewer)", ("teacher", "student"),
          ("system", "test accuracy", "train samples/s", "train wall", "latency b=1", "throughput", "size on disk"),
          lambda n: [fmt(n, "accuracy", pct), fmt(n, "samples_per_s", lambda x: f"{x:.1f}"), *speed_cells(n)],
          "kdistill's default recipe against the same distillation written by hand: the run's fine-tuned "
          "teacher, the same student (the same layers of the same pretrained encoder), the same labeled and "
          "transfer rows, epochs, batch size, lr, temperature and loss weights. train samples/s = training rows x "
          "epochs / train wall time."),
    Table("peers-instruct", 34, trl_peer.RECIPE, "Peers: instruction distillation (TRL GKD)",
          ("teacher", "untrained", "student"),
          ("system", "task score", "agrees with teacher", "tokens learned", "tokens learned/s", "train wall",
           "on-policy batches", "size on disk"),
          lambda n: [fmt(n, "task_score", pct), fmt(n, "agreement_with_teacher", pct),
                     fmt(n, "targets", lambda x: f"{x:,.0f}"), fmt(n, "tokens_per_s", lambda x: f"{x:.1f}"),
                     fmt(n, "train_wall_time_s", seconds),
                     DASH if "batches" not in n else f"{n.get('on_policy_batches', 0)} of {n['batches']}",
                     fmt(n, "size_mb", lambda x: f"{x:.1f} MiB")],
          "kdistill's instruction distillation against TRL's GKDTrainer on the same work: the instruct recipe with "
          "SmolLM2-135M-Instruct as the teacher and a student cut from it (one tokenizer, which GKD needs), the same chat rows (gold responses and "
          "the teacher's stored responses to the transfer prompts), the same starting weights, teacher, steps, "
          "batch, lr and max lengths; the same loss (generalized JSD) and share of on-policy batches. Task score: "
          "the recipe's scorer on greedy test responses; tokens learned/s: response tokens learned per second of "
          "training, generation included."),
)}


# ---------------------------------------------------------------------------------------------------- kdistill

def kdistill_overrides(recipe: str, args) -> list[str]:
    """The --set overrides of kdistill's run of `recipe`: its table's own, --quick's, the thread count, then the
    user's."""
    items = list(RECIPE_SETS.get(recipe, []))
    items += [*QUICK[recipe], *QUICK_EVAL] if args.quick else []
    items += [f"train.num_threads={args.threads}", f"eval.num_threads={args.threads}"]
    return items + [item.split(":", 1)[1] for item in args.set if item.split(":", 1)[0] == recipe]


def reusable(run_dir: Path, cfg) -> bool:
    """Whether `run_dir` is a finished kdistill run of exactly `cfg`."""
    from kdistill.config import load_config
    from kdistill.errors import UserError

    if not (run_dir / "metrics.json").is_file():
        return False
    try:
        return load_config(run_dir / "config.yaml").model_dump() == cfg.model_dump()
    except UserError:
        return False


def prepare(recipe: str, args) -> Setup:
    """kdistill's run of `recipe` (made, or reused), its data exported, and where its teacher and student come
    from."""
    import kdistill
    from kdistill.config import load_config
    from kdistill.data import load_data
    from kdistill.errors import UserError
    from kdistill.models import resolve_model_source
    from kdistill.tasks.embedding import embedding_teacher_dir

    overrides = kdistill_overrides(recipe, args)
    cfg = load_config(recipe, overrides)
    work = args.out / recipe
    run_dir = work / "kdistill"
    instruction = cfg.task == "instruction"
    counted = work / trl_peer.TOKENS_FILE
    if reusable(run_dir, cfg) and (not instruction or trl_peer.has_counts(counted)):
        print(f"peers: reusing kdistill's run {run_dir}", file=sys.stderr)
    else:
        print(f"peers: kdistill run {recipe} {' '.join(overrides)} -> {run_dir}", file=sys.stderr)
        counted.unlink(missing_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        # stdout keeps the tables alone; an instruction run's learned tokens are counted as it trains
        with stdout_to_stderr(), trl_peer.counting(counted) if instruction else nullcontext():
            kdistill.run(recipe, set=overrides, out=str(run_dir), overwrite=True)
    if instruction:
        return trl_peer.prepare(recipe, cfg, run_dir, work, quick=args.quick, threads=args.threads)
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    data = load_data(cfg.data)
    if data.summary()["sizes"] != metrics["data"]["sizes"]:
        raise UserError(f"{run_dir}: its split ({metrics['data']['sizes']}) is not the one load_data gives now "
                        f"({data.summary()['sizes']}); remove the run dir")
    init = json.loads((run_dir / "student" / "kdistill.json").read_text(encoding="utf-8"))["student_init"]
    embedding = cfg.task == "embedding"
    teacher_dir = embedding_teacher_dir(cfg) if embedding else run_dir / "teacher"
    setup = Setup(
        recipe=recipe, cfg=cfg, data=data, data_dir=export_data(data, work / "data"), run_dir=run_dir, work=work,
        teacher_dir=Path(teacher_dir), base_dir=Path(resolve_model_source(cfg.teacher.model)[0]),
        student_dir=Path(resolve_model_source(init["source"])[0]) if "source" in init else Path(teacher_dir),
        student_layers=list(init["teacher_layers"]), quick=args.quick, threads=args.threads)
    if embedding:
        setup.teacher_test = teacher_vectors(setup)
    return setup


def teacher_vectors(setup: Setup):
    """The teacher's vectors of the test texts, as kdistill's evaluation computes them (Encodings, embed)."""
    from kdistill.data import Encodings
    from kdistill.measure import embed, torch_threads
    from kdistill.models import load_model_dir, read_pooling

    model, tokenizer, _ = load_model_dir(setup.teacher_dir, task="embedding")
    encoded = Encodings(setup.cfg.data.max_length)(setup.data, tokenizer, ("test",))["test"]
    with torch_threads(setup.threads):
        return embed(model, encoded, tokenizer, read_pooling(setup.teacher_dir))


def kdistill_systems(setup: Setup, roles: set[str]) -> dict[str, tuple[dict, Path]]:
    """kdistill's rows: each model's numbers from the run's metrics.json (its own timings left out: the harness
    times every system the same way), its size on disk, and its dir."""
    metrics = json.loads((setup.run_dir / "metrics.json").read_text(encoding="utf-8"))
    shape = metrics.get("student_shape") or {}
    trained = len(setup.data.splits["train"]) + len(setup.data.unlabeled)
    out = {}
    for role in sorted(roles):
        numbers = {k: v for k, v in metrics["models"][role].items() if k not in SPEED_KEYS}
        model_dir = setup.teacher_dir if role == "teacher" else setup.run_dir / role
        numbers["size_mb"] = disk_mb(model_dir)
        if role == "student" and numbers.get("train_wall_time_s"):
            numbers["samples_per_s"] = trained * setup.cfg.train.epochs / numbers["train_wall_time_s"]
        out[f"kdistill:{role}"] = ({"label": kdistill_label(setup, role, shape), **numbers}, model_dir)
    return out


def kdistill_label(setup: Setup, role: str, shape: dict) -> str:
    s = shape.get("student") or {}
    student = f"{s.get('layers')} x {s.get('hidden')}, FFN {s.get('ffn')}"
    if role == "teacher":
        return f"teacher ({setup.cfg.teacher.model}{'' if setup.cfg.task == 'embedding' else ', fine-tuned'})"
    if role == "student":
        return f"kdistill student ({student})"
    return f"kdistill no-KD control ({student}, {'untrained' if setup.cfg.task == 'embedding' else 'labels only'})"


def kdistill_speed_worker(setup: Setup) -> str:
    """The worker whose speed mode times kdistill's models (in kdistill's own venv): the library that loads them."""
    return "worker_st_distill.py" if setup.cfg.task == "embedding" else "worker_hf_trainer_kd.py"


# ------------------------------------------------------------------------------------------------------- peers

def run_peer(peer, setup: Setup, args) -> tuple[dict, Path | None]:
    """A peer's systems (name -> (numbers, model dir)) and its venv's python; a failure, its one line."""
    work = setup.work / peer.name
    try:
        python = ensure_venv(peer.name, peer.packages, work / "install.log")
        job = {"mode": "train", **peer.job(setup), "out": str(work / "out")}
        (work / "out").mkdir(parents=True, exist_ok=True)
        timeout = args.timeout or (QUICK_TIMEOUT_S if args.quick else peer.timeout_s)
        print(f"peers: {peer.name}: training (limit {timeout} s; log {work / 'train.log'})", file=sys.stderr)
        result = run_worker(python, peer.worker, job, work, timeout_s=timeout, threads=args.threads)
        try:
            return peer.systems(setup, work / "out", result), python
        except (OSError, KeyError, ValueError) as e:  # outputs missing or malformed: this peer's row, not the run
            raise PeerFailed(f"reading {peer.name}'s outputs: {type(e).__name__}: {e}") from e
    except PeerFailed as e:
        print(f"peers: {peer.name}: failed: {e}", file=sys.stderr)
        return {peer.name: ({"failed": str(e)}, None)}, None


def run_recipe(recipe: str, tables: list[Table], peers: list, args) -> dict:
    """Every system of `tables` (all on `recipe`): {"setup": the recipe's Setup, "entries": system name -> its
    peers.json entry}."""
    setup = prepare(recipe, args)
    instruction = setup.cfg.task == "instruction"
    roles = {role for t in tables for role in t.kdistill_rows}
    systems = {name: ("kdistill", numbers, model_dir) for name, (numbers, model_dir) in
               (trl_peer.kdistill_systems if instruction else kdistill_systems)(setup, roles).items()}
    targets = {name: SpeedTarget(Path(sys.executable), kdistill_speed_worker(setup), model_dir)
               for name, (_, _, model_dir) in systems.items()}
    for peer in peers:
        made, python = run_peer(peer, setup, args)
        for name, (numbers, model_dir) in made.items():
            systems[name] = (peer.name, numbers, model_dir)
            if python is not None:
                targets[name] = SpeedTarget(python, peer.worker, model_dir)
    if instruction:  # scored by generation, one architecture: no speed rounds
        return {"setup": setup, "entries": {name: {"system": system, **numbers}
                                            for name, (system, numbers, _) in systems.items()}}
    ev = setup.cfg.eval
    print(f"peers: timing {', '.join(targets)} ({args.speed_rounds} round(s))", file=sys.stderr)
    speed = measure_speed(targets, setup.data_dir / "test.jsonl", setup.work / "speed", rounds=args.speed_rounds,
                          batch_size=ev.throughput_batch_size, warmup=ev.warmup, repeats=ev.repeats,
                          max_length=setup.cfg.data.max_length, threads=args.threads, timeout_s=SPEED_TIMEOUT_S)
    entries = {name: {"system": system, **numbers, **speed.get(name, {})}
               for name, (system, numbers, _) in systems.items()}
    return {"setup": setup, "entries": entries}


# ----------------------------------------------------------------------------------------------------- outputs

def peers_json(table: Table, setup: Setup, entries: dict, names: list[str], args, command: str) -> dict:
    """The table's peers.json (see the module doc)."""
    import torch

    from kdistill.measure import machine_info

    ev = setup.cfg.eval
    head = {"table": table.id, "recipe": table.recipe, "task": setup.cfg.task, "quick": args.quick,
            "kdistill_run": str(setup.run_dir), "command": command, "commit": git_commit(),
            "date": datetime.date.today().isoformat(),
            "machine": {**machine_info(), "torch_threads": torch.get_num_threads(), "threads": args.threads}}
    if setup.cfg.task == "instruction":
        return {**head, "data": trl_peer.data_summary(setup), "budget": trl_peer.budget(setup), "speed": None,
                "units": trl_peer.UNITS, "models": {name: entries[name] for name in names}}
    units = {"latency_ms_batch1": "ms", "throughput_per_s": "examples/s", "size_mb": "MiB", "train_wall_time_s": "s",
             "samples_per_s": "training examples/s"}
    if setup.cfg.task == "embedding":
        units.update(spearman_agreement="Spearman rho", recall_at_10="fraction", knn_accuracy="fraction")
    return {
        **head, "data": setup.data.summary(), "budget": budget(setup),
        "speed": {"scope": "text in, output out (tokenization included)", "rounds": args.speed_rounds,
                  "warmup": ev.warmup, "repeats": ev.repeats, "throughput_batch_size": ev.throughput_batch_size,
                  "threads": args.threads},
        "units": units,
        "models": {name: entries[name] for name in names},
    }


def table_row(table: Table, numbers: dict) -> list[str]:
    label = numbers.get("label") or numbers["system"]
    if "failed" in numbers:
        return [label, f"failed: {numbers['failed']}", *[DASH] * (len(table.columns) - 2)]
    return [label, *table.cells(numbers)]


def summary(table: Table, doc: dict, args) -> dict:
    """The results page's summary of one table (benchmarks/render_results.py's format)."""
    notes = trl_peer.notes(table.about, doc) if doc["task"] == "instruction" else speed_table_notes(table, doc)
    failed = [f"{e.get('label', name)}: {e['speed_failed']}" for name, e in doc["models"].items()
              if "speed_failed" in e]
    if failed:
        notes.append("Timing failed for " + "; ".join(failed) + ".")
    title = table.title + (" (quick smoke run: tiny sizes, not a measurement)" if args.quick else "")
    return {
        "id": table.id, "order": table.order, "title": title, "recipe": table.recipe, "command": doc["command"],
        "commit": doc["commit"], "machine": machine_line(args.threads), "date": doc["date"],
        "source": f"benchmarks/peers/run.py, {display(args.out / table.id / 'peers.json')}",
        "notes": notes, "columns": list(table.columns),
        "rows": [table_row(table, e) for e in doc["models"].values()],
    }


def speed_table_notes(table: Table, doc: dict) -> list[str]:
    """The notes of a table whose systems were timed in speed rounds (classification, embedding)."""
    data, b, speed = doc["data"], doc["budget"], doc["speed"]
    sizes = data["sizes"]
    rows_read = (f"{sizes['train']:,} training rows ({sizes['train'] - data['unlabeled_train']:,} labeled)"
                 + (f" + {data['unlabeled_file_rows']:,} unlabeled texts" if data["unlabeled_file_rows"] else ""))
    notes = [
        table.about,
        f"Data: {data['source']}, {rows_read}; {sizes['validation']:,} validation and {sizes['test']:,} test rows, "
        f"kdistill's split, exported once and read by every system. Budget: {b['epochs']:g} epoch(s), batch "
        f"{b['batch_size']}, lr {b['lr']:g}, max_length {b['max_length']}"
        + (f", T = {b['temperature']:g}, losses {json.dumps(b['losses'])}" if doc["task"] != "embedding" else "")
        + ". kdistill's rows are its run's metrics.json (its own timings aside); each peer ran in its own venv "
          "(torch 2.13.0, pinned versions in its row and in peers.json).",
        *[PEERS[name].note for name in dict.fromkeys(e["system"] for e in doc["models"].values()) if name in PEERS],
        f"Speed: from raw text to output (tokenization included) through each system's own library, "
        f"{speed['threads']} thread(s); batch-1 latency and throughput at batch {speed['throughput_batch_size']}, "
        f"medians of {speed['repeats']} (batch 1) timed calls after {speed['warmup']} untimed, pooled over "
        f"{speed['rounds']} round(s) in which every system took its turn. Size: every file of the model dir. "
        "Wall times on a shared machine are noisy: compare within this table.",
    ]
    return notes


def display(path: Path) -> str:
    """`path` relative to the repo where it lies inside it."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def write_json(path: Path, obj: dict) -> None:
    from kdistill.io import atomic_write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, obj)


# -------------------------------------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers.run", description=__doc__.splitlines()[0])
    parser.add_argument("--peers", nargs="+", choices=list(PEERS), default=list(PEERS), metavar="PEER",
                        help=f"which peers (default: all): {', '.join(PEERS)}")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes (data.limit=48, 1 epoch, short timings; instruct: trl_peer.QUICK): a smoke "
                             "run of minutes")
    parser.add_argument("--out", type=Path, help="work dir (default: runs/peers, --quick: runs/peers-quick)")
    parser.add_argument("--results-dir", type=Path,
                        help="where the tables' summaries go (default: docs/results; --quick: <out>/results)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every training and timing")
    parser.add_argument("--speed-rounds", type=int,
                        help="timing rounds, every system timed once per round (default 3; --quick: 1)")
    parser.add_argument("--timeout", type=int, help="seconds each peer may train (default: the peer's own limit)")
    parser.add_argument("--set", action="append", default=[], metavar="RECIPE:KEY=VALUE",
                        help=f"an override of kdistill's run of RECIPE ({', '.join(QUICK)}), which every peer of "
                             "its tables then follows")
    parser.add_argument("--install-only", action="store_true", help="build the peers' venvs and stop")
    args = parser.parse_args(argv)
    for item in args.set:
        if item.split(":", 1)[0] not in QUICK or ":" not in item:
            parser.error(f"--set {item}: expected RECIPE:KEY=VALUE with RECIPE one of {', '.join(QUICK)}")
    if args.threads < 1 or (args.speed_rounds is not None and args.speed_rounds < 1):
        parser.error("--threads and --speed-rounds must be at least 1")
    args.out = args.out or ROOT / "runs" / ("peers-quick" if args.quick else "peers")
    args.speed_rounds = args.speed_rounds or (1 if args.quick else 3)
    args.results_dir = args.results_dir or (args.out / "results" if args.quick else RESULTS_DIR)
    if args.quick and args.results_dir.resolve() == RESULTS_DIR.resolve():
        parser.error("--quick numbers are a smoke test: they never go into docs/results")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from kdistill.errors import UserError

    peers = [PEERS[name] for name in args.peers]
    if args.install_only:
        for peer in peers:
            try:
                print(peer.name, ensure_venv(peer.name, peer.packages, args.out / "install" / f"{peer.name}.log"))
            except PeerFailed as e:
                print(f"peers: {peer.name}: failed: {e}", file=sys.stderr)
                return 1
        return 0
    command = "python -m benchmarks.peers.run" + "".join(f" {shlex.quote(a)}" for a in (argv or sys.argv[1:]))
    tables = [t for t in TABLES.values() if any(p.table == t.id for p in peers)]
    failed = []
    try:
        for recipe in dict.fromkeys(t.recipe for t in tables):
            mine = [t for t in tables if t.recipe == recipe]
            done = run_recipe(recipe, mine, [p for p in peers if p.table in {t.id for t in mine}], args)
            for table in mine:
                names = [f"kdistill:{role}" for role in table.kdistill_rows] + [
                    name for name, e in done["entries"].items()
                    if e["system"] in PEERS and PEERS[e["system"]].table == table.id]
                doc = peers_json(table, done["setup"], done["entries"], names, args, command)
                write_json(args.out / table.id / "peers.json", doc)
                write_json(args.results_dir / f"{table.id}.json", summary(table, doc, args))
                print(f"peers: {table.id}: {display(args.out / table.id / 'peers.json')}, "
                      f"{display(args.results_dir / f'{table.id}.json')}", file=sys.stderr)
                print_table(table, doc)
                failed += [name for name in names if "failed" in doc["models"][name]]
    except UserError as e:
        print(f"peers: {e}", file=sys.stderr)
        return 2
    if not args.quick:
        print("peers: now run python -m benchmarks.render_results to regenerate docs/results.md", file=sys.stderr)
    if failed:
        print(f"peers: failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def print_table(table: Table, doc: dict) -> None:
    """The table as Markdown on stdout."""
    print(f"\n{table.title}\n")
    print("| " + " | ".join(table.columns) + " |")
    print("|" + "---|" * len(table.columns))
    for e in doc["models"].values():
        print("| " + " | ".join(table_row(table, e)) + " |")


if __name__ == "__main__":
    sys.exit(main())
