"""The task protocol and registry: every task kdistill can run, by the name a recipe gives in `task`.

A task is one module under `kdistill/tasks/` that builds one `Task` (below) and names it `TASK`: how its data is
read, which loss terms apply and what they count, how its models are loaded, its pipeline, its report and its
predictor. Code outside `kdistill/tasks/` never compares task names: it asks the task (`get_task(cfg.task)`) and
calls what the task gives.

This module sits at the bottom of the layers (it imports nothing of kdistill but errors), so that config, terms
and models can ask a task. The task modules themselves sit near the top, above the pipeline whose stages they
compose: a lower layer reaches a task only through this registry, at run time, never by import. The built-in
task modules are imported the first time their name is looked up. A task defined elsewhere joins with
`register` (a test, a script), or as a plugin: an installed package that declares an entry point in the group
"kdistill.tasks" (name = the task's name, value = the module or object holding its `TASK`), loaded the first time
its name is asked for, so that `kdistill run` in a new process finds it too.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

BUILTIN_MODULES = {
    "classification": "kdistill.tasks.classification",
    "token-classification": "kdistill.tasks.token_classification",
    "embedding": "kdistill.tasks.embedding",
    "causal-lm": "kdistill.tasks.causal_lm",
    "instruction": "kdistill.tasks.instruction",
}
"""Built-in task name -> the module that defines it (imported on first use)."""

ENTRY_POINT_GROUP = "kdistill.tasks"
"""The entry-point group through which installed packages add tasks."""

DEFAULT_TASK = "classification"
"""The task of a recipe that names none, and of a model dir no task claims (a plain sequence classifier)."""


def _no_check(*_args, **_kwargs) -> None:
    return None


@dataclass(frozen=True)
class Task:
    """What kdistill needs to know of a task, and the hooks through which the layers run it.

    Plain facts (names, units, metric keys) are fields; behaviour is a hook, a function the task module wires from
    the layers below it. Hooks left None mean "this task does not do that" (e.g. no `predictor`: no predict, serve
    or ONNX export), and the verb that needs one says so in one line.
    """

    name: str
    """The value of `task` in a recipe and in a model dir's kdistill.json."""
    summary: str
    """One sentence: what the task learns and how it is scored."""
    term_units: Mapping[str, str | None]
    """Loss-term family -> what its count counts for this task (one of terms.UNITS), or None for the row's own
    unit. A term (a row of terms.TERMS) applies to the task when its family is a key here."""
    headline: tuple[str, ...]
    """The metric keys `kdistill evaluate` prints first, headline first."""
    run: Callable[..., Any]
    """`kdistill run` for this task: (cfg, out, *, resume, overwrite) -> run dir."""
    load_data: Callable[..., Any] | None = None
    """(DataConfig) -> data.DataBundle: the task's splits (None: the task reads its data inside `run`)."""
    auto_model: Any = None
    """The transformers Auto class that loads this task's model dirs and pretrained models."""
    scratch_model: Any = None
    """The BERT class of a teacher trained from scratch (teacher.from_scratch); None: not supported."""
    features: frozenset[str] = frozenset()
    """Optional abilities the generic layers ask about: "fsdp" (sharded students), "two_stage"
    (distill.intermediate_epochs), "prune_student_model" (a student.model cut to the recipe's shape), "trim_vocab"
    (student.trim_vocab: the trained student's WordPiece vocabulary cut to its texts' tokens), "held_out_limit"
    (data.held_out_limit: a cap of its own on the validation and test splits), "teacher_endpoint" (teacher.endpoint:
    a teacher behind an OpenAI-compatible API), "llm_teacher" (teacher.llm: a prompted causal LM's verbalizer
    scores as the teacher's soft labels)."""
    length_key: str = "data.max_length"
    """The recipe key that bounds an example's length in tokens (checked against the teacher's positions)."""
    check_config: Callable[..., None] = _no_check
    """(RunConfig) -> None, raising ValueError: the task's own recipe rules (config validation calls it)."""
    preflight: Callable[..., None] = _no_check
    """(RunConfig, *, distilling) -> None, raising UserError: the task's checks of a recipe before any file is
    read, any data loaded or any dir written."""
    preflight_files: Callable[..., None] = _no_check
    """(RunConfig, *, distilling) -> None, raising UserError: the task's checks that read the (existing) model
    dirs the recipe names, e.g. that teacher and student tokenizers fit."""
    claims: Callable[[dict, Any], bool] | None = None
    """(config.json as a dict, model dir Path) -> whether a dir without kdistill.json holds this task's model."""
    student_model: Callable[..., Any] | None = None
    """(RunConfig, teacher) -> the recipe's student.model loaded for this task."""
    data_for_model: Callable[..., Any] | None = None
    """(model dir, ModelDirInfo, DataConfig, spec) -> DataBundle whose label ids are the model's."""
    evaluate_dir: Callable[..., dict] | None = None
    """(ModelDirInfo, DataBundle, *, split, teacher) -> metrics of one model dir (`kdistill evaluate`)."""
    parity_data: Callable[..., tuple] | None = None
    """(DataBundle) -> (texts, gold label ids or None) that check an export's parity."""
    predictor: Callable[..., Any] | None = None
    """(ModelDirInfo, tokenizer, runner, max_length) -> a deploy Predictor; None: not predictable or exportable
    to ONNX."""
    needs_labels: bool = True
    """Whether a model dir of this task must name its classes (config.json id2label) to be predicted with."""
    export_files: Callable[..., None] | None = None
    """(export dir, ModelDirInfo, model, max_length) -> None: files an export of this task needs beside the model."""
    teacher_signal: Callable[..., Any] | None = None
    """(RunConfig, out) -> the signal's dir: store the teacher's outputs once (`kdistill teacher-signal`); None:
    the task has no stored teacher signal."""
    default_losses: Mapping[str, float] | None = None
    """The distill.losses of a recipe that sets none; None: the config's default (the encoder terms)."""
    report_columns: list = field(default_factory=list)
    """The summary table's columns: (header, metric key, format)."""
    report: Callable[..., Any] | None = None
    """(runs, out dir) -> report.md path: the task's report (runs: report.load_run of each run dir)."""

    def has(self, feature: str) -> bool:
        return feature in self.features

    def applies(self, family: str) -> bool:
        """Whether loss terms of `family` apply to this task."""
        return family in self.term_units


_registered: dict[str, Task] = {}


def register(task: Task, *, replace: bool = False) -> Task:
    """Make `task` known by its name (a recipe's `task`). A built-in name is taken unless `replace`."""
    if not replace and (task.name in _registered or task.name in BUILTIN_MODULES):
        raise ValueError(f"task {task.name!r} is already registered")
    _registered[task.name] = task
    return task


def unregister(name: str) -> None:
    """Forget a task registered with `register` (a test's own task, once the test is done)."""
    if name in BUILTIN_MODULES:
        raise ValueError(f"task {name!r} is built in")
    _registered.pop(name, None)


def _plugins() -> dict:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def task_names() -> list[str]:
    """Every task's name: the built-in ones first, then those registered, then the plugins'."""
    names = [*BUILTIN_MODULES, *(n for n in _registered if n not in BUILTIN_MODULES)]
    return names + sorted(n for n in _plugins() if n not in names)


def get_task(task: str | Task) -> Task:
    """The task named `task` (a Task is returned as it is). ValueError naming the known tasks otherwise."""
    if isinstance(task, Task):
        return task
    if task not in _registered and task in BUILTIN_MODULES:
        _registered[task] = importlib.import_module(BUILTIN_MODULES[task]).TASK
    elif task not in _registered and task in (plugins := _plugins()):
        loaded = plugins[task].load()
        _registered[task] = getattr(loaded, "TASK", loaded)
    if task not in _registered:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(task_names())}")
    return _registered[task]


def guess_task(config: dict, path: Any = None) -> Task:
    """The task of a model dir that does not say (no kdistill.json): the first task whose `claims` accepts its
    config.json (and files), registered tasks before built-in ones; else the default task."""
    names = [*(n for n in _registered if n not in BUILTIN_MODULES), *BUILTIN_MODULES]
    for name in names:
        task = get_task(name)
        if task.claims is not None and task.claims(config, path):
            return task
    return get_task(DEFAULT_TASK)
