"""The peer harness's shared parts, in the main process: each peer's venv, running a worker under a time limit, the
data export every peer reads, the speed rounds, and scoring with kdistill's own metric functions.

A peer is one `Peer`: its pinned packages, its worker script (run by its venv's python, see timing.py for the
protocol), the job it sends and how its outputs become rows (`systems`). Everything a peer needs from the run
(`Setup`) comes from kdistill's own config, loaders and run dir, so the split, teacher and budget are kdistill's.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TORCH = "torch==2.13.0"
"""Installed into every peer venv first, and held there by a constraint file: an unpinned torch is a CUDA build."""
STAMP = "kdistill-peer.json"
INSTALL_TIMEOUT_S = 1800
TEXT_FIELDS = ("text", "text_pair")
CHECK_TORCH = ("import sys, torch; sys.exit(0 if torch.__version__.split('+')[0] == '2.13.0' and torch.version.cuda "
               "is None else f'torch {torch.__version__} (CUDA {torch.version.cuda}) instead of 2.13.0 CPU')")


class PeerFailed(Exception):
    """A peer's install, worker or scoring failed; the one-line message becomes its row's `failed: ...`."""


@dataclass
class Setup:
    """One recipe's run, as every system of its tables sees it."""

    recipe: str
    cfg: object
    """kdistill's RunConfig of the recipe (with the harness's overrides)."""
    data: object
    """kdistill's DataBundle of it (load_data), the split every system is scored on."""
    data_dir: Path
    """The same data as JSON Lines (`export_data`): what the workers read."""
    run_dir: Path
    """kdistill's run of the recipe: its teacher, student, no-KD baseline and metrics.json."""
    work: Path
    """Where the peers of this recipe write (one dir each)."""
    teacher_dir: Path
    """embedding: the given sentence encoder; classification: the run's fine-tuned teacher."""
    base_dir: Path
    """The pretrained model the run's teacher started from (classification: SetFit's body)."""
    student_dir: Path
    """The pretrained model the run's student was cut from."""
    student_layers: list[int]
    """Which of student_dir's layers the run's student kept, in order."""
    quick: bool
    threads: int
    teacher_test: object = None
    """embedding: the teacher's (N_test, D) vectors by kdistill's own `embed`, what agreement is measured against."""


@dataclass(frozen=True)
class Peer:
    name: str
    table: str
    packages: tuple[str, ...]
    """Pinned requirements installed after torch (the venv is rebuilt when they change)."""
    worker: str
    """Its script in this dir, run by its venv's python."""
    job: Callable[[Setup], dict]
    """The train job's parameters (paths, budget) for a recipe's setup."""
    systems: Callable[[Setup, Path, dict], dict[str, tuple[dict, Path]]]
    """(setup, the worker's out dir, its result) -> system name -> (its numbers, its model dir for timing)."""
    timeout_s: int
    """The train job's limit at full size."""
    note: str
    """What it runs, in a sentence or two: a paragraph of its tables' notes (Markdown)."""


# ---------------------------------------------------------------------------------------------------- processes

def last_line(path: Path, limit: int = 300) -> str:
    """The last non-empty line of a log, shortened to `limit` characters."""
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError:
        return "(no log)"
    line = next((line for line in reversed(lines) if line), "(empty log)")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def run_logged(command: list, log: Path, what: str, *, timeout_s: float = INSTALL_TIMEOUT_S,
               env: dict | None = None, cwd: Path | None = None) -> None:
    """Run `command`, its output appended to `log`; PeerFailed naming `what` and the log's last line when it exits
    non-zero or runs past `timeout_s` (then it and its children are killed)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a", encoding="utf-8") as f:
        f.write("$ " + " ".join(map(str, command)) + "\n")
        f.flush()
        # its own process group: a timeout or Ctrl-C ends the worker's children too, not only the worker
        proc = subprocess.Popen([str(c) for c in command], stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, cwd=cwd, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout_s)
        except BaseException as e:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if isinstance(e, subprocess.TimeoutExpired):
                raise PeerFailed(f"{what}: timed out after {timeout_s:.0f} s") from None
            raise
    if code != 0:
        raise PeerFailed(f"{what}: {last_line(log)} (exit {code})")


def worker_env(threads: int) -> dict:
    """The environment of a worker: `threads` threads for every pool (OpenMP, MKL, the tokenizers' Rayon pool),
    offline (everything a worker reads is local), no venv of the caller's."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    n = str(threads)
    env.update(OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, OPENBLAS_NUM_THREADS=n, RAYON_NUM_THREADS=n,
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               WANDB_DISABLED="true", PYTHONUNBUFFERED="1")
    return env


def run_worker(python: Path, worker: str, job: dict, work: Path, *, timeout_s: float, threads: int) -> dict:
    """Run `worker` (a script in this dir) on `job` with `python`, in `work`; its result dict, or PeerFailed with
    one line (the worker's last log line, or the timeout). Files in `work`: <mode>-job.json, <mode>.log,
    <mode>-result.json."""
    work.mkdir(parents=True, exist_ok=True)
    mode = job["mode"]
    result = work / f"{mode}-result.json"
    job = {**job, "threads": threads, "result": str(result)}
    result.unlink(missing_ok=True)
    log = work / f"{mode}.log"
    log.unlink(missing_ok=True)
    job_path = work / f"{mode}-job.json"
    job_path.write_text(json.dumps(job, indent=2) + "\n", encoding="utf-8")
    # cwd: what a library writes where it runs (SetFit's checkpoints/, a trainer's runs/) stays in `work`
    run_logged([python, HERE / worker, job_path], log, worker, timeout_s=timeout_s, env=worker_env(threads), cwd=work)
    if not result.is_file():
        raise PeerFailed(f"{worker}: exited without writing {result.name}")
    return json.loads(result.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------------------- venvs

def venv_dir(name: str) -> Path:
    """`<kdistill cache>/peers/<name>-venv` (the cache is $KDISTILL_CACHE_DIR, else ~/.cache/kdistill)."""
    from kdistill.assets import cache_root

    return cache_root() / "peers" / f"{name}-venv"


def venv_stamp(packages: tuple[str, ...]) -> dict:
    """What a peer venv must have been built with to be reused."""
    return {"python": platform.python_version(), "torch": TORCH, "packages": list(packages)}


def ensure_venv(name: str, packages: tuple[str, ...], log: Path) -> Path:
    """The python of `name`'s venv, built first (venv, torch, then `packages`, torch checked) unless its stamp says
    it holds exactly these pins. A venv of other pins, or a half-built one, is removed and rebuilt."""
    root = venv_dir(name)
    python = root / "bin" / "python"
    wanted = venv_stamp(packages)
    try:
        stamp = json.loads((root / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        stamp = {}
    if {k: stamp.get(k) for k in wanted} == wanted and python.exists():
        return python
    if root.exists():
        if not (root / "pyvenv.cfg").is_file():
            raise PeerFailed(f"{root} exists and is not a venv: remove it or set KDISTILL_CACHE_DIR")
        shutil.rmtree(root)  # a venv this harness made, for other pins or interrupted while installing
    root.parent.mkdir(parents=True, exist_ok=True)
    print(f"peers: building {root} (torch first, then {' '.join(packages)}); log: {log}", file=sys.stderr)
    run_logged([sys.executable, "-m", "venv", root], log, f"{name}: python -m venv")
    constraints = root / "constraints.txt"
    constraints.write_text(TORCH + "\n", encoding="utf-8")
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
    run_logged([*pip, TORCH], log, f"{name}: pip install {TORCH}")
    run_logged([*pip, "-c", constraints, *packages], log, f"{name}: pip install {' '.join(packages)}")
    run_logged([python, "-c", CHECK_TORCH], log, f"{name}: torch check")
    freeze = subprocess.run([python, "-m", "pip", "freeze", "--disable-pip-version-check"], capture_output=True,
                            text=True, check=True).stdout.split()
    (root / STAMP).write_text(json.dumps({**wanted, "freeze": freeze}, indent=2) + "\n", encoding="utf-8")
    return python


# ---------------------------------------------------------------------------------------------------------- data

def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def export_data(data, out: Path) -> Path:
    """Write kdistill's split (`data`: a DataBundle from kdistill's load_data) as every worker reads it, rows in
    kdistill's order: train/validation/test.jsonl {"text", ["text_pair"], "label": class name, or null for a
    training row whose label data.labeled_limit hides}, unlabeled.jsonl (data.unlabeled_file's rows, {"text"}) and
    data.json (label names, source, sizes)."""
    from kdistill.data import SPLITS, UNLABELED

    out.mkdir(parents=True, exist_ok=True)
    names = data.label_names
    for split in SPLITS:
        write_jsonl(out / f"{split}.jsonl", [
            {**{k: row[k] for k in TEXT_FIELDS if k in row},
             "label": None if row["label"] == UNLABELED else names[row["label"]]}
            for row in data.splits[split].to_list()])
    write_jsonl(out / "unlabeled.jsonl", [{k: row[k] for k in TEXT_FIELDS if k in row} for row in data.unlabeled])
    sizes = {split: len(data.splits[split]) for split in SPLITS}
    (out / "data.json").write_text(json.dumps({"label_names": names, "source": data.source, "sizes": sizes,
                                               "unlabeled": len(data.unlabeled)}, indent=2) + "\n", encoding="utf-8")
    return out


def budget(setup: Setup) -> dict:
    """The student's training budget and loss in the recipe (what every peer's student gets)."""
    train, distill = setup.cfg.train, setup.cfg.distill
    return {"epochs": train.epochs, "batch_size": train.batch_size, "lr": train.lr, "warmup_ratio": train.warmup_ratio,
            "weight_decay": train.weight_decay, "max_grad_norm": train.max_grad_norm, "seed": train.seed,
            "max_length": setup.cfg.data.max_length, "temperature": distill.temperature,
            "losses": dict(distill.losses)}


# ----------------------------------------------------------------------------------------------------- scoring

def disk_mb(path: Path) -> float:
    """Every file under a model dir (weights, tokenizer, config, head), MiB."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


def score_predictions(setup: Setup, predicted: list[str]) -> dict:
    """kdistill's quality_metrics of predicted class names against the test split's labels."""
    from kdistill.measure import quality_metrics

    names = setup.data.label_names
    labels = list(setup.data.splits["test"]["label"])
    if len(predicted) != len(labels):
        raise PeerFailed(f"{len(predicted)} predictions for {len(labels)} test rows")
    unknown = sorted(set(predicted) - set(names))
    if unknown:
        raise PeerFailed(f"predicted label(s) {', '.join(map(repr, unknown[:3]))} not among {', '.join(names)}")
    return quality_metrics([names.index(p) for p in predicted], labels, names)


def score_vectors(setup: Setup, path: Path) -> dict:
    """kdistill's embedding_metrics of a worker's vectors.npz (train: (N_train, D), test: (N_test, D), rows in
    the split's order): agreement with the teacher's test vectors, and k-NN accuracy (train = index) where the
    data has labels, as kdistill's own evaluation does."""
    import numpy as np

    from kdistill.data import UNLABELED
    from kdistill.measure import embedding_metrics

    with np.load(path) as vectors:
        train, test = vectors["train"], vectors["test"]
    splits = setup.data.splits
    if (len(train), len(test)) != (len(splits["train"]), len(splits["test"])):
        raise PeerFailed(f"{path.name}: {len(train)} train and {len(test)} test vectors for {len(splits['train'])} "
                         f"and {len(splits['test'])} rows")
    labeled = bool(setup.data.label_names) and all(
        y != UNLABELED for split in ("train", "test") for y in splits[split]["label"])
    knn = (train, splits["train"]["label"], test, splits["test"]["label"]) if labeled else None
    return embedding_metrics(test, setup.teacher_test, knn=knn)


def system_numbers(label: str, quality: dict, result: dict, model_dir: Path) -> dict:
    """One system's entry of peers.json: its label, quality numbers, what its worker timed and counted, and its
    size on disk."""
    counted = ("train_wall_time_s", "teacher_embeddings_s", "steps", "examples", "samples_per_s", "versions")
    return {"label": label, **quality, **{k: result[k] for k in counted if k in result}, "size_mb": disk_mb(model_dir)}


def classifier_system(setup: Setup, out: Path, result: dict, label: str) -> dict:
    """The entry of a worker that wrote out/model and out/predictions.json (class names of the test rows)."""
    predicted = json.loads((out / "predictions.json").read_text(encoding="utf-8"))
    return system_numbers(label, score_predictions(setup, predicted), result, out / "model")


def vector_system(setup: Setup, out: Path, result: dict, label: str) -> dict:
    """The entry of a worker that wrote out/model and out/vectors.npz."""
    return system_numbers(label, score_vectors(setup, out / "vectors.npz"), result, out / "model")


# ------------------------------------------------------------------------------------------------------- speed

@dataclass(frozen=True)
class SpeedTarget:
    """How to time one system: its worker's speed mode, run by `python`, on `model`."""

    python: Path
    worker: str
    model: Path


def measure_speed(targets: dict[str, SpeedTarget], texts: Path, work: Path, *, rounds: int, batch_size: int,
                  warmup: int, repeats: int, max_length: int, threads: int, timeout_s: float) -> dict[str, dict]:
    """name -> {latency_ms_batch1, throughput_per_s, throughput_batch_size, threads}, or {"speed_failed": line}.

    Each round times every system once, one after another (A, B, C, A, B, C, ...), each in a fresh process of its
    own venv (timing.time_texts on `texts`); a slow phase of the shared machine then hits all systems alike.
    The numbers are medians over the timings of all rounds."""
    timings = {name: {"single_s": [], "batch_s": []} for name in targets}
    failed = {}
    for r in range(rounds):
        for name, target in targets.items():
            if name in failed:
                continue
            job = {"mode": "speed", "model": str(target.model), "texts": str(texts), "batch_size": batch_size,
                   "warmup": warmup, "repeats": repeats, "max_length": max_length}
            try:
                out = run_worker(target.python, target.worker, job, work / name.replace(":", "-") / f"round-{r + 1}",
                                 timeout_s=timeout_s, threads=threads)
            except PeerFailed as e:
                failed[name] = str(e)
                continue
            for key in ("single_s", "batch_s"):
                timings[name][key] += out[key]
    return {name: {"speed_failed": failed[name]} if name in failed else {
        "latency_ms_batch1": statistics.median(t["single_s"]) * 1000,
        "throughput_per_s": batch_size / statistics.median(t["batch_s"]),
        "throughput_batch_size": batch_size, "threads": threads, "speed_rounds": rounds}
        for name, t in timings.items()}


# ------------------------------------------------------------------------------------------------- provenance

def machine_line(threads: int) -> str:
    """`2-core AMD EPYC 7B13; torch 2.13.0+cpu CPU, 2 threads`: the machine as the results page names it."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass  # not Linux: platform's name of the processor
    return f"{os.cpu_count()}-core {cpu}; torch {torch.__version__} CPU, {threads} thread{'s' * (threads != 1)}"


def git_commit() -> str:
    """The checkout's commit (short), marked when the work tree differs from it; "not recorded" outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "not recorded"
    return f"{commit} (with uncommitted changes)" if dirty else commit
