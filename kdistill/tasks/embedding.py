"""Task `embedding`: sentence embeddings (Reimers & Gurevych 2020).

A frozen sentence-transformers teacher; the student (layers of the teacher's transformer, or student.model) with
the teacher's pooling learns the teacher's pooled embeddings on the run's texts (labels unused; unlabeled texts
add more) through distill/explicit.py; the teacher is given, never trained. The no-KD control is the same student
untrained: its initialisation, saved as "baseline". Terms: pooled_mse, pooled_cosine, pooled_contrastive. Score:
agreement with the teacher (Spearman ρ of pairwise cosines, recall@10 of its neighbours) and k-NN accuracy.
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import AutoModel

from kdistill.augment import with_transfer
from kdistill.config import EvalConfig, RunConfig
from kdistill.data import UNLABELED, DataBundle, Encodings, load_data
from kdistill.deploy.predict import EmbeddingPredictor
from kdistill.errors import UserError
from kdistill.measure import compare_speed, embed, embedding_metrics
from kdistill.models import (
    ST_MODULES,
    dir_size_mb,
    load_model_dir,
    read_meta,
    read_pooling,
    resolve_model_source,
    save_sentence_encoder,
    write_sentence_transformer_files,
)
from kdistill.pipeline.common import is_saved, phase_checkpoints, run_metrics, save_history
from kdistill.pipeline.distillation import distill_student
from kdistill.pipeline.encoder import check_trim_vocab, finish_run, run_encoder, trimmed_student
from kdistill.pipeline.students import make_student, student_reads
from kdistill.pipeline.verbs import data_config_for, select_split
from kdistill.reporting import EMBEDDING_COLUMNS, write_embedding_report
from kdistill.student import count_parameters, describe_student
from kdistill.task import Task
from kdistill.training import is_main_process

log = logging.getLogger(__name__)

TASK_NAME = "embedding"


def embedding_teacher_dir(cfg: RunConfig) -> Path:
    """The teacher sentence encoder's dir: teacher.path, or teacher.model (built-in alias or local dir)."""
    if cfg.teacher.from_scratch is not None and not cfg.teacher.path:
        raise UserError("teacher.from_scratch: task embedding distils a given sentence encoder; set teacher.model "
                        "(minilm-l6, mpnet-base or a sentence-transformers dir)")
    name = cfg.teacher.path or cfg.teacher.model
    if not name:
        raise UserError("teacher.model: task embedding needs a sentence-transformers teacher (minilm-l6, mpnet-base "
                        "or a dir)")
    source, extra = resolve_model_source(name)
    if extra or not Path(source).is_dir():
        raise UserError(f"teacher.model: {name}: task embedding needs a local sentence-transformers dir")
    return Path(source)

def check_embedding(cfg: RunConfig) -> None:
    """What an embedding run supports, checked before any data is read: a sentence-transformers teacher kdistill can
    pool, the explicit strategy."""
    read_pooling(embedding_teacher_dir(cfg))
    if cfg.distill.strategy != "explicit":
        raise UserError(f"distill.strategy: task embedding supports explicit (a frozen teacher), not "
                        f"{cfg.distill.strategy}")

def run_embedding_phases(cfg: RunConfig, data: DataBundle, run_dir: Path, *, resume: bool, started: float,
                         fingerprint: dict) -> Path:
    """Baseline (the student's initialisation), student (distilled), then evaluation and report (main process)."""
    main = is_main_process()
    encodings = Encodings(cfg.data.max_length)
    teacher_dir = embedding_teacher_dir(cfg)
    pooling = read_pooling(teacher_dir)
    teacher, tokenizer, _ = load_model_dir(teacher_dir, task=TASK_NAME)
    student_tokenizer, cross, calibration = student_reads(cfg, data, encodings, tokenizer)
    check_trim_vocab(cfg, student_tokenizer)
    student, init_layers = make_student(cfg, teacher, calibration)
    shapes = describe_student(teacher, student)

    def save(model, name: str, meta: dict, its_tokenizer=student_tokenizer) -> None:
        save_sentence_encoder(model, its_tokenizer, run_dir / name, {"task": cfg.task,
                              "max_length": cfg.data.max_length,
                              "student_init": shapes["init"], **meta}, pooling, cfg.data.max_length)

    models = {"teacher": (teacher_dir, None), "student": (run_dir / "student", None)}
    if cfg.distill.baseline:  # the no-KD control: the same student, not trained at all
        if main and not (resume and is_saved(run_dir / "baseline")):
            save(student, "baseline", {"role": "no-KD baseline: the student's initialisation, untrained",
                                       "train_wall_time_s": 0.0})
        models["baseline"] = (run_dir / "baseline", None)
    if resume and is_saved(run_dir / "student"):
        log.info("student: distilled before the run was resumed (%s)", run_dir / "student")
    else:
        checkpoints = phase_checkpoints(cfg, run_dir, "student", resume, fingerprint)
        student_data = with_transfer(data, cfg.data, teacher, tokenizer)  # data.unlabeled_file: more texts to learn
        teacher_train = encodings(student_data, tokenizer, ("train",))["train"] if cross else None
        history, _ = distill_student(cfg, teacher, student_tokenizer, encodings(student_data, student_tokenizer),
                                     run_dir, init_layers, student, checkpoints,
                                     teacher_tokenizer=tokenizer if cross else None, teacher_train=teacher_train,
                                     pooling=pooling)
        models["student"] = (run_dir / "student", history)
        if main:
            save_history(run_dir, history)
            saved, saved_tokenizer, trimmed = trimmed_student(cfg, student, student_tokenizer, student_data)
            save(saved, "student", {"role": "student", "strategy": cfg.distill.strategy, "losses": cfg.distill.losses,
                                    "train_wall_time_s": history.wall_time_s, **trimmed}, saved_tokenizer)
            checkpoints.clear()
    if not main:
        return run_dir
    metrics = evaluate_embedding_run(cfg, models, data, shapes, encodings)
    return finish_run(cfg, run_dir, data, metrics, started)

def evaluate_embedding_run(cfg: RunConfig, models: dict, data: DataBundle, shapes: dict | None,
                           encodings: Encodings) -> dict:
    """Every sentence encoder of the run on the same held-out texts (the test split): `embedding_results`, and
    each one's speed-up, size ratio and k-NN accuracy relative to the teacher."""
    results = embedding_results(models, data, encodings, cfg.eval)
    t = results["teacher"]
    for r in results.values():
        r["speedup_vs_teacher"] = t["latency_ms_batch1"] / r["latency_ms_batch1"]
        r["size_ratio_vs_teacher"] = t["params"] / r["params"]
        if "knn_accuracy" in r:
            r["knn_accuracy_delta_vs_teacher_points"] = 100 * (r["knn_accuracy"] - t["knn_accuracy"])
    return run_metrics(cfg, data, shapes, results, spearman_agreement="Spearman rho", recall_at_10="fraction",
                       knn_accuracy="fraction", knn_accuracy_delta_vs_teacher_points="percentage points")

def embedding_results(models: dict, data: DataBundle, encodings: Encodings, eval_cfg: EvalConfig, *,
                      knn: bool = True) -> dict:
    """name -> numbers of each sentence encoder in `models` (name -> (dir, history or None)) on the test split,
    each in its own tokenization: agreement with models["teacher"] where there is one (Spearman ρ of pairwise
    cosines, recall@10 of its neighbours), k-NN accuracy (train split as the index, test split as queries) where
    `knn` and the data has labels, size, and speed measured interleaved."""
    labeled = knn and bool(data.label_names) and all(
        y != UNLABELED for split in ("train", "test") for y in data.splits[split]["label"])
    splits = ("train", "test") if labeled else ("test",)
    loaded, inputs, vectors = {}, {}, {}
    for name, (path, _) in models.items():
        model, tokenizer, _ = load_model_dir(path, task=TASK_NAME)
        encoded = encodings(data, tokenizer, splits)
        loaded[name], inputs[name] = model, (encoded["test"], tokenizer)
        vectors[name] = {split: embed(model, encoded[split], tokenizer, read_pooling(path)) for split in splits}
    results = {}
    for name, (path, history) in models.items():
        v = vectors[name]
        knn_data = (v["train"], data.splits["train"]["label"], v["test"], data.splits["test"]["label"]) \
            if labeled else None
        teacher_test = vectors["teacher"]["test"] if "teacher" in vectors else None
        results[name] = {**embedding_metrics(v["test"], teacher_test, knn=knn_data),
                         "params": count_parameters(loaded[name]), "size_mb": dir_size_mb(path),
                         "train_wall_time_s": history.wall_time_s if history else
                         read_meta(path).get("train_wall_time_s")}
    for name, numbers in compare_speed(loaded, inputs, eval_cfg).items():
        results[name].update(numbers)
    return results


def check_config(cfg) -> None:
    if cfg.data.augment:
        raise ValueError("data.augment works with task classification only; embedding takes more texts through "
                         "data.unlabeled_file")


def preflight(cfg, *, distilling: bool) -> None:
    check_embedding(cfg)


def claims(_config: dict, path) -> bool:
    """A sentence-transformers dir (its modules.json) is a sentence encoder."""
    return path is not None and (Path(path) / ST_MODULES).is_file()


def whole_student_model(cfg, _teacher):
    return load_model_dir(cfg.student.model, task=TASK_NAME)[0]


def run(cfg: RunConfig, out=None, *, resume: bool = False, overwrite: bool = False) -> Path:
    return run_encoder(cfg, out, resume=resume, overwrite=overwrite, phases=run_embedding_phases)


def evaluate_dir(info, spec: str, overrides: list[str], *, split: str, teacher) -> dict:
    """k-NN accuracy (the train split as the index) and, with `teacher` (a sentence-transformers dir), agreement
    with that teacher on the split."""
    data = select_split(load_data(data_config_for(spec, overrides)), split)
    models = {"model": (info.path, None), **({"teacher": (Path(teacher), None)} if teacher else {})}
    max_length = info.meta.get("max_length") or 512
    return embedding_results(models, data, Encodings(max_length), EvalConfig(),
                             knn=split in ("test", "validation"))["model"]


def texts_of(_model_dir, _info, data_cfg, _spec):
    """`kdistill evaluate` / `export --data`: the data as it is (a sentence encoder has no label ids to match)."""
    return load_data(data_cfg)


def texts(data):
    """Export parity: the test texts (their pooled vectors are compared)."""
    return list(data.splits["test"]["text"]), None


def predictor(info, tokenizer, runner, max_length):
    return EmbeddingPredictor(tokenizer=tokenizer, runner=runner, labels=[], max_length=max_length, info=info,
                              pooling=read_pooling(info.path))


def export_files(out: Path, info, model, max_length: int) -> None:
    """The sentence-transformers module files: the pooling an exported encoder's predictor applies."""
    write_sentence_transformer_files(out, read_pooling(info.path), model.config.hidden_size, max_length)


TASK = Task(
    name=TASK_NAME,
    summary="Sentence embeddings: the student learns a sentence-transformers teacher's pooled vectors; scored by "
            "agreement with the teacher and k-NN accuracy.",
    term_units={"pooled": None},
    headline=("knn_accuracy", "spearman_agreement", "recall_at_10"),
    run=run,
    load_data=load_data,
    auto_model=AutoModel,  # the base model, pooled by its dir's Pooling (read_pooling)
    features=frozenset({"trim_vocab"}),
    check_config=check_config,
    preflight=preflight,
    claims=claims,
    student_model=whole_student_model,
    data_for_model=texts_of,
    evaluate_dir=evaluate_dir,
    parity_data=texts,
    predictor=predictor,
    export_files=export_files,
    report_columns=EMBEDDING_COLUMNS,
    report=write_embedding_report,
    needs_labels=False,
)
