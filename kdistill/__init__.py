"""kdistill: knowledge distillation for Transformers, measured end to end.

The verbs of the `kdistill` command are functions here, with the command's arguments (an option is the keyword
argument of its name: `--set` is `set=[...]`, `--out` is `out=`). Each returns what the command reports (a run dir,
metrics, predictions) and raises `UserError`, whose one-line message names the file or key to fix, where the
command prints that line and exits with code 2:

    import kdistill
    run_dir = kdistill.run("tiny", set=["train.epochs=1"], out="runs/try")
    kdistill.evaluate(run_dir / "student", data="bbc-news")

The config types are here too: `load_config` (a recipe and `--set` overrides -> `RunConfig`), `RunConfig` and its
sections. Verbs and config types load on first use, so `import kdistill` imports neither torch nor transformers.
"""

from __future__ import annotations

import importlib

from kdistill.errors import UserError

__version__ = "0.1.0"

VERBS = ("run", "distill", "train_teacher", "teacher_signal", "evaluate", "report", "export", "predict", "serve",
         "recipes", "datasets", "validate")
"""The command's verbs (kdistill.cli), as Python names: `train-teacher` is `train_teacher`."""

CONFIG_TYPES = ("RunConfig", "load_config", "AugmentConfig", "DataConfig", "FromScratchConfig", "TeacherConfig",
                "StudentConfig", "DistillConfig", "TrainConfig", "EvalConfig", "ExportConfig")
"""From kdistill.config: the run's configuration, its sections, and the recipe loader."""

__all__ = [*VERBS, *CONFIG_TYPES, "UserError"]


def __getattr__(name: str):
    """A verb or config type, imported on first use."""
    if name in VERBS:
        value = getattr(importlib.import_module("kdistill.cli"), name)
    elif name in CONFIG_TYPES:
        value = getattr(importlib.import_module("kdistill.config"), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
