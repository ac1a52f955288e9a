"""The verbs over one recipe or one model dir that are not a whole run: `kdistill run` (the task's own pipeline),
`kdistill train-teacher`, `kdistill teacher-signal` and `kdistill evaluate`, and the data a model dir is
evaluated or exported on."""

from __future__ import annotations

from pathlib import Path

from datasets import concatenate_datasets

from kdistill.config import DataConfig, EvalConfig, RunConfig, parse_override, validate_config
from kdistill.data import BUILTIN_DATASETS, TOKEN_DATASETS, DataBundle, tokenize_splits
from kdistill.errors import UserError
from kdistill.measure import evaluate_model, machine_info
from kdistill.io import atomic_write_json, check_writable, output_errors
from kdistill.models import ModelDirInfo, inspect_model_dir, load_model_dir
from kdistill.pipeline.encoder import teacher_run
from kdistill.task import get_task, task_names

__all__ = ["data_config_for", "data_for_model", "evaluate_classifier_dir", "evaluate_dir", "run", "select_split",
           "signal_run", "teacher_run"]

SPLIT_CHOICES = ("test", "validation", "train", "all")


def run(cfg: RunConfig, out: str | Path | None = None, *, resume: bool = False, overwrite: bool = False) -> Path:
    """`kdistill run`: the whole pipeline of the recipe's task (Task.run); returns the run directory.

    resume: `out` is a run dir a killed run left; phases whose model is saved are skipped, the phase it was in
    continues from its last checkpoint. overwrite: `out` may hold files; the outputs of an earlier run there are
    removed first (rundir.py), other files are kept. Several processes (torchrun / accelerate launch) train
    together; the main process alone writes files and evaluates."""
    return get_task(cfg.task).run(cfg, out, resume=resume, overwrite=overwrite)


def signal_run(cfg: RunConfig, out: str | Path | None = None) -> Path:
    """`kdistill teacher-signal`: the recipe's task stores its teacher's outputs once (Task.teacher_signal)."""
    task = get_task(cfg.task)
    if task.teacher_signal is None:
        having = " or ".join(n for n in task_names() if get_task(n).teacher_signal is not None)
        raise UserError(f"task: the teacher signal is for {having} recipes, not {cfg.task}")
    return task.teacher_signal(cfg, out)


def data_config_for(spec: str, overrides: list[str]) -> DataConfig:
    """`--data SPEC`: a built-in dataset name or a data file, plus `--set data.x=y` overrides."""
    builtin = spec in BUILTIN_DATASETS or spec in TOKEN_DATASETS
    raw = {"data": {"dataset": spec} if builtin else {"train_file": spec, "dataset": None}}
    for item in overrides:
        keys, value = parse_override(item)
        if keys[0] != "data" or len(keys) != 2:
            raise UserError(f"--set {item}: only data.* keys apply here")
        raw["data"][keys[1]] = value
    return validate_config(raw, "--data").data


def data_for_model(model_dir: str | Path, spec: str, overrides: list[str]) -> DataBundle:
    """Data whose label ids are those of the model's config (the same names, in the model's order)."""
    model_dir = Path(model_dir)
    info = inspect_model_dir(model_dir)
    task = get_task(info.task)
    if task.data_for_model is None:
        raise UserError(f"{model_dir}: a {info.task} model dir is not evaluated on labeled data")
    return task.data_for_model(model_dir, info, data_config_for(spec, overrides), spec)


def select_split(data: DataBundle, split: str) -> DataBundle:
    """`data` with `split` (test, validation, train or all: every row) as its test split."""
    if split != "test":
        data.splits["test"] = concatenate_datasets(list(data.splits.values())) if split == "all" \
            else data.splits[split]
    return data


def evaluate_classifier_dir(info: ModelDirInfo, spec: str, overrides: list[str], *, split: str,
                            teacher: str | Path | None) -> dict:
    """Task.evaluate_dir of a classifier (of texts or of tokens): quality, size and speed on the split."""
    if teacher is not None:
        raise UserError(f"--teacher: only sentence encoders are compared with a teacher; {info.path} is a "
                        f"{info.task} model")
    data = select_split(data_for_model(info.path, spec, overrides), split)
    model, tokenizer, meta = load_model_dir(info.path)
    max_length = meta.get("max_length") or min(tokenizer.model_max_length, 512)
    encoded = tokenize_splits(data, tokenizer, max_length, ("test",))["test"]
    return evaluate_model(model, tokenizer, encoded, data.scored_tags, EvalConfig(), info.path)


def evaluate_dir(model_dir: str | Path, spec: str, *, split: str = "test", overrides: list[str] | None = None,
                 out: str | Path | None = None, teacher: str | Path | None = None) -> dict:
    """`kdistill evaluate`: every number of one model dir on one split of a dataset, as its task measures it
    (Task.evaluate_dir; a sentence encoder also takes `teacher`, a dir to measure agreement with)."""
    if split not in SPLIT_CHOICES:
        raise UserError(f"--split: {split!r} is not one of {', '.join(SPLIT_CHOICES)}")
    info = inspect_model_dir(model_dir)
    task = get_task(info.task)
    if task.evaluate_dir is None:
        raise UserError(f"{model_dir}: kdistill evaluate does not measure {info.task} model dirs; a run's report "
                        "does")
    target = Path(out) if out else Path(model_dir) / "metrics.json"
    check_writable(target)  # before the model is loaded and measured
    metrics = task.evaluate_dir(info, spec, overrides or [], split=split, teacher=teacher)
    metrics.update({"model": str(model_dir), "task": info.task, "data": spec, "split": split,
                    "machine": machine_info(), "train_wall_time_s": info.meta.get("train_wall_time_s")})
    with output_errors(target):
        atomic_write_json(target, metrics)
    return metrics
