"""The pipeline of the encoder tasks (classification, token classification; sentence embeddings with phases of its
own): the teacher, the student (its vocabulary trimmed to its texts' tokens with student.trim_vocab) and its no-KD
baseline, then evaluation, export and the report."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from kdistill.augment import with_transfer
from kdistill.config import RunConfig
from kdistill.data import DataBundle, Encodings
from kdistill.deploy.export import export_model
from kdistill.errors import UserError
from kdistill.measure import compare_speed, evaluate_model
from kdistill.io import atomic_write_json
from kdistill.models import load_model_dir, read_meta, save_model
from kdistill.pipeline.common import (
    is_saved,
    phase_checkpoints,
    run_dir_of,
    run_metrics,
    save_history,
    training_data,
    writing,
)
from kdistill.pipeline.distillation import distill_student
from kdistill.pipeline.preflight import preflight
from kdistill.pipeline.students import make_student, student_reads
from kdistill.reporting import write_report
from kdistill.rundir import run_dir_for, run_fingerprint
from kdistill.student import check_trimmable, describe_student, trim_vocabulary
from kdistill.task import get_task
from kdistill.teacher import finetune, train_teacher
from kdistill.training import is_main_process, world_size

log = logging.getLogger(__name__)


def run_encoder(cfg: RunConfig, out: str | Path | None = None, *, resume: bool = False, overwrite: bool = False,
                phases: Callable[..., Path] | None = None) -> Path:
    """`kdistill run` for an encoder task: preflight, its data, then `phases` (default `run_phases`: teacher,
    student, baseline, evaluation, export, report) in the claimed run dir; returns the run directory.

    resume: `out` is a run dir a killed run left; phases whose model is saved are skipped, the phase it was in
    continues from its last checkpoint. overwrite: `out` may hold files; the outputs of an earlier run there are
    removed first (rundir.py), other files are kept. Several processes (torchrun / accelerate launch) train
    together; the main process alone writes files and evaluates."""
    phases = phases or run_phases
    started = time.perf_counter()
    run_dir = run_dir_of(cfg, out)
    preflight(cfg, run_dir, resume=resume, overwrite=overwrite)  # bad input fails before anything is written
    data = get_task(cfg.task).load_data(cfg.data)
    log.info("data: %s; world size %d", json.dumps(data.summary()["sizes"]), world_size())
    fp = run_fingerprint(cfg, training_data(data))
    with run_dir_for(cfg, run_dir, fp, resume=resume, overwrite=overwrite), writing(run_dir):
        return phases(cfg, data, run_dir, resume=resume, started=started, fingerprint=fp)


def get_teacher(cfg: RunConfig, data: DataBundle, encodings: Encodings, run_dir: Path, *, resume: bool = False,
                fingerprint: dict | None = None):
    """(teacher, tokenizer, teacher dir, training history or None): a given trained teacher, or train one (a
    resumed run: the one it trained already, or continue training it). fingerprint: the run's, for checkpoints."""
    if cfg.teacher.path:
        path = Path(cfg.teacher.path)
        model, tokenizer, meta = load_model_dir(path)
        names = [model.config.id2label[i] for i in range(model.config.num_labels)]
        if names != data.label_names:
            raise UserError(f"teacher.path: {path} was trained on labels {names}, the data has {data.label_names}")
        return model, tokenizer, path, None
    teacher_dir = run_dir / "teacher"
    if resume and is_saved(teacher_dir):
        log.info("teacher: trained before the run was resumed, loaded from %s", teacher_dir)
        model, tokenizer, _ = load_model_dir(teacher_dir)
        return model, tokenizer, teacher_dir, None
    checkpoints = phase_checkpoints(cfg, run_dir, "teacher", resume, fingerprint)
    model, tokenizer, history = train_teacher(cfg, data, encodings, teacher_dir, log_dir=run_dir / "logs",
                                              checkpoints=checkpoints)
    if is_main_process():
        save_history(run_dir, history)
        checkpoints.clear()
    return model, tokenizer, teacher_dir, history

def run_phases(cfg: RunConfig, data: DataBundle, run_dir: Path, *, resume: bool, started: float,
               fingerprint: dict) -> Path:
    """Teacher, student, teacher_after, baseline; then evaluation, export and report (main process). Each split is
    tokenized once per tokenizer (data.Encodings) and handed to every phase that reads it."""
    main = is_main_process()
    encodings = Encodings(cfg.data.max_length, cfg.data.label_all_subtokens)
    teacher, tokenizer, teacher_dir, _ = get_teacher(cfg, data, encodings, run_dir, resume=resume,
                                                     fingerprint=fingerprint)
    student_data = with_transfer(data, cfg.data, teacher, tokenizer)  # augmentation reads the teacher's embeddings
    teacher_before = None
    if cfg.distill.strategy != "explicit":
        # the teacher keeps learning: keep its pre-distillation weights to report both
        teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}

    student_tokenizer, cross, calibration = student_reads(cfg, data, encodings, tokenizer)
    check_trim_vocab(cfg, student_tokenizer)
    student, init_layers = make_student(cfg, teacher, calibration)
    shapes = describe_student(teacher, student)
    baseline_init = {k: v.clone() for k, v in student.state_dict().items()} if cfg.distill.baseline else None

    models = {"teacher": (teacher_dir, None), "student": (run_dir / "student", None)}
    learns_too = cfg.distill.strategy != "explicit"  # the teacher kept learning: teacher_after
    if resume and is_saved(run_dir / "student") and (not learns_too or is_saved(run_dir / "teacher_after")):
        log.info("student: distilled before the run was resumed (%s)", run_dir / "student")
        if learns_too:
            models["teacher_after"] = (run_dir / "teacher_after", None)
    else:
        checkpoints = phase_checkpoints(cfg, run_dir, "student", resume, fingerprint)
        teacher_train = encodings(student_data, tokenizer, ("train",))["train"] if cross else None
        history, teacher_history = distill_student(cfg, teacher, student_tokenizer,
                                                   encodings(student_data, student_tokenizer), run_dir, init_layers,
                                                   student, checkpoints, teacher_tokenizer=tokenizer if cross else None,
                                                   teacher_train=teacher_train)
        models["student"] = (run_dir / "student", history)
        meta = {"task": cfg.task, "max_length": cfg.data.max_length, "strategy": cfg.distill.strategy,
                "losses": cfg.distill.losses, "student_init": shapes["init"],
                "train_wall_time_s": history.wall_time_s}
        if main:
            save_history(run_dir, history)
            saved, saved_tokenizer, trimmed = trimmed_student(cfg, student, student_tokenizer, student_data)
            save_model(saved, saved_tokenizer, run_dir / "student", {"role": "student", **meta, **trimmed})
            checkpoints.clear()
        if teacher_history is not None:
            if main:
                save_history(run_dir, teacher_history)
                save_model(teacher, tokenizer, run_dir / "teacher_after",
                           {"role": "teacher after " + cfg.distill.strategy, "task": cfg.task,
                            "max_length": cfg.data.max_length})
            models["teacher_after"] = (run_dir / "teacher_after", teacher_history)
            teacher.load_state_dict(teacher_before)

    if baseline_init is not None:
        models["baseline"] = train_baseline(cfg, run_dir, student, baseline_init, student_tokenizer,
                                            encodings(data, student_tokenizer), resume=resume, fingerprint=fingerprint)

    if not main:  # evaluation, export and report: the main process alone
        return run_dir
    metrics = evaluate_run(cfg, run_dir, models, student_data, shapes, encodings)  # (data summary: transfer rows)
    return finish_run(cfg, run_dir, data, metrics, started)

def train_baseline(cfg: RunConfig, run_dir: Path, student, init: dict, tokenizer, encoded, *, resume: bool,
                   fingerprint: dict) -> tuple:
    """The no-KD baseline: `student` reset to `init` (the distilled student's start) trained on the gold labels
    alone (`encoded`: the data without transfer rows), saved to run_dir/baseline; a resumed run's saved one is
    kept. Returns its (dir, history or None) for evaluate_run."""
    if resume and is_saved(run_dir / "baseline"):
        log.info("baseline: trained before the run was resumed (%s)", run_dir / "baseline")
        return run_dir / "baseline", None
    student.load_state_dict(init)  # same shape, same init: the loss is the only difference
    checkpoints = phase_checkpoints(cfg, run_dir, "baseline", resume, fingerprint)
    history = finetune(student, tokenizer, encoded, cfg.train, name="baseline", task=cfg.task,
                       log_dir=run_dir / "logs", checkpoints=checkpoints)
    if is_main_process():
        save_history(run_dir, history)
        save_model(student, tokenizer, run_dir / "baseline",
                   {"role": "no-KD baseline", "task": cfg.task, "max_length": cfg.data.max_length,
                    "train_wall_time_s": history.wall_time_s})
        checkpoints.clear()
    return run_dir / "baseline", history

def check_trim_vocab(cfg: RunConfig, student_tokenizer) -> None:
    """student.trim_vocab needs a WordPiece student tokenizer: checked before training, not after it."""
    if cfg.student.trim_vocab:
        try:
            check_trimmable(student_tokenizer)
        except ValueError as e:
            raise UserError(f"student.trim_vocab: {e}") from None

def learned_texts(data: DataBundle) -> list:
    """The texts of the student's train split (its transfer rows included): texts, text pairs, or pre-split
    sentences (token classification). The held-out splits are never read."""
    train = data.splits["train"]
    return [row for column in ("text", "text_pair", "tokens") if column in train.column_names
            for row in train[column]]

def trimmed_student(cfg: RunConfig, student, tokenizer, data: DataBundle) -> tuple:
    """(model, tokenizer, meta) to save as the run's student: with student.trim_vocab a copy over the vocabulary of
    the texts it learned from (`data`: its training data; student.trim_vocabulary) and {"vocab": sizes and
    parameters before and after} for its kdistill.json; else `student`, `tokenizer` and {}. The no-KD baseline
    is not trimmed: it keeps the whole vocabulary its init came with."""
    if not cfg.student.trim_vocab:
        return student, tokenizer, {}
    model, trimmed, info = trim_vocabulary(getattr(student, "module", student), tokenizer, learned_texts(data))
    log.info("student.trim_vocab: %d of %d tokens kept; %d -> %d parameters", info["student"], info["teacher"],
             info["params_before"], info["params_after"])
    return model, trimmed, {"vocab": info}

def record_vocab(metrics: dict, student_dir: Path) -> None:
    """A trimmed student's vocabulary (its kdistill.json "vocab") into metrics.json: under models.student, and the
    student's shape (its parameters after trimming, for the report's student line)."""
    vocab = read_meta(student_dir).get("vocab") if student_dir.is_dir() else None
    if not vocab or "student" not in metrics.get("models", {}):
        return
    metrics["models"]["student"]["vocab"] = vocab
    shape = metrics.get("student_shape")
    if shape:
        shape["vocab"] = vocab
        shape["student"]["params"] = vocab["params_after"]
        shape["param_ratio"] = vocab["params_after"] / shape["teacher"]["params"]

def finish_run(cfg: RunConfig, run_dir: Path, data: DataBundle, metrics: dict, started: float) -> Path:
    """An encoder run's last steps (main process): export the student, then metrics.json and the report."""
    record_vocab(metrics, run_dir / "student")
    if cfg.export.formats:
        metrics["exports"] = export_student(cfg, run_dir, data)
    metrics["total_wall_time_s"] = time.perf_counter() - started
    atomic_write_json(run_dir / "metrics.json", metrics)
    write_report([run_dir])
    return run_dir

def evaluate_run(cfg: RunConfig, run_dir: Path, models: dict, data: DataBundle, shapes: dict | None,
                 encodings: Encodings) -> dict:
    """Every model of the run on the same test split, each in its own tokenization (a student.model may read
    another than the teacher); speed measured side by side, interleaved."""
    loaded, inputs = {}, {}
    for name, (path, _) in models.items():
        loaded[name], tokenizer, _ = load_model_dir(path)
        inputs[name] = (encodings(data, tokenizer, ("test",))["test"], tokenizer)
    results = {}
    for name, model in loaded.items():
        path, history = models[name]
        encoded_test, tokenizer = inputs[name]
        results[name] = evaluate_model(model, tokenizer, encoded_test, data.scored_tags, cfg.eval, path,
                                       speed=False)
        results[name]["train_wall_time_s"] = history.wall_time_s if history else \
            read_meta(path).get("train_wall_time_s")
        budget = history.budget() if history else read_meta(path).get("training")
        if budget:
            results[name]["training"] = budget
    speed = compare_speed(loaded, inputs, cfg.eval)
    for name, numbers in speed.items():
        results[name].update(numbers)
    teacher = results.get("teacher", next(iter(results.values())))
    for name, r in results.items():
        r["accuracy_retained_pct"] = 100 * r["accuracy"] / teacher["accuracy"] if teacher["accuracy"] else None
        if "entity_f1" in r:  # token classification: the headline number
            r["entity_f1_retained_pct"] = 100 * r["entity_f1"] / teacher["entity_f1"] if teacher["entity_f1"] else None
        r["speedup_vs_teacher"] = teacher["latency_ms_batch1"] / r["latency_ms_batch1"]
        r["size_ratio_vs_teacher"] = teacher["params"] / r["params"]
    return run_metrics(cfg, data, shapes, results)

def export_student(cfg: RunConfig, run_dir: Path, data: DataBundle) -> dict:
    """Export the run's student in each of export.formats, each with a parity check on the test split's texts
    (and, for a classifier, its labels)."""
    texts, labels = get_task(cfg.task).parity_data(data)
    out = {}
    for fmt in cfg.export.formats:
        kind, quant = ("onnx", "int8") if fmt == "onnx-int8" else (fmt, None)
        # overwrite: the run dir is this run's (rundir.py), so an export dir there is one its killed attempt left
        out[fmt] = export_model(run_dir / "student", fmt=kind, out_dir=run_dir / "export" / fmt, quantize=quant,
                                parity_texts=texts, parity_labels=labels, overwrite=True)
    return out

def teacher_run(cfg: RunConfig, out: str | Path | None = None, *, overwrite: bool = False) -> tuple[Path, Path]:
    """`kdistill train-teacher`: train (or take teacher.path) and evaluate the teacher alone; (run dir, teacher
    dir)."""
    if cfg.teacher.llm:
        raise UserError(f"teacher.llm: {cfg.teacher.llm.model} is prompted as it is, not trained; `kdistill run` "
                        "scores the texts with it and trains the student")
    run_dir = run_dir_of(cfg, out)
    preflight(cfg, run_dir, overwrite=overwrite, distilling=False)
    data = get_task(cfg.task).load_data(cfg.data)
    fp = run_fingerprint(cfg, training_data(data))
    with run_dir_for(cfg, run_dir, fp, overwrite=overwrite), writing(run_dir):
        encodings = Encodings(cfg.data.max_length, cfg.data.label_all_subtokens)
        _, _, teacher_dir, history = get_teacher(cfg, data, encodings, run_dir, fingerprint=fp)
        standalone_metrics(cfg, run_dir, {"teacher": (teacher_dir, history)}, data, encodings)
    return run_dir, teacher_dir

def standalone_metrics(cfg: RunConfig, run_dir: Path, models: dict, data: DataBundle, encodings: Encodings) -> dict:
    """Evaluate the given models (e.g. just the teacher) and write metrics.json + report (main process)."""
    if not is_main_process():
        return {}
    metrics = evaluate_run(cfg, run_dir, models, data, None, encodings)
    atomic_write_json(run_dir / "metrics.json", metrics)
    write_report([run_dir])
    return metrics
