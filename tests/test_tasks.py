"""The task layer: a task is one module (kdistill/tasks/) behind the registry (kdistill/task.py); outside the
tasks, no code branches on a task's name; a task defined here, in a test, runs end to end through run, evaluate
and predict without touching any other module."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest

from kdistill.config import load_config
from kdistill.data import load_data
from kdistill.deploy.predict import load_predictor
from kdistill.pipeline import evaluate_dir, run
from kdistill.task import BUILTIN_MODULES, get_task, guess_task, register, task_names, unregister
from kdistill.terms import TERMS
from tests.helpers import scratch_teacher_recipe, write_recipe

PACKAGE = Path(__file__).resolve().parents[1] / "kdistill"
TASK_NAMES = frozenset(BUILTIN_MODULES)


def _is_task_value(node: ast.AST) -> bool:
    """An expression that holds a task's name: `task`, `cfg.task`, `info.task`, `metrics["task"]`, or a literal
    task name."""
    if isinstance(node, ast.Name):
        return node.id == "task"
    if isinstance(node, ast.Attribute):
        return node.attr == "task"
    if isinstance(node, ast.Subscript):
        return isinstance(node.slice, ast.Constant) and node.slice.value == "task"
    return isinstance(node, ast.Constant) and node.value in TASK_NAMES


def _holds_task(node: ast.AST) -> bool:
    """A variable holding a task's name (not a literal: `reply["embedding"]` reads a field of that name)."""
    return not isinstance(node, ast.Constant) and _is_task_value(node)


def _names_in(node: ast.AST) -> list[str]:
    """The literal task names directly in a tuple / list / set display."""
    elts = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else []
    return [e.value for e in elts if isinstance(e, ast.Constant) and e.value in TASK_NAMES]


def task_branches(source: str) -> list[tuple[int, str]]:
    """(line, what) of every place `source` branches on a task outside the task modules: a comparison or membership
    test with a task value, a dict keyed by task names or looked up with a task value, and a collection of task
    names (a constant that hides the same branch)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(_is_task_value(s) or _names_in(s) for s in sides):
                found.append((node.lineno, "compares a task"))
        elif isinstance(node, ast.Dict):
            if sum(isinstance(k, ast.Constant) and k.value in TASK_NAMES for k in node.keys) >= 2:
                found.append((node.lineno, "a dict keyed by task names"))
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)) and len(_names_in(node)) >= 2:
            found.append((node.lineno, "a collection of task names"))
        elif isinstance(node, ast.Subscript) and _holds_task(node.slice):
            found.append((node.lineno, "looks a task up in a table"))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" \
                and node.args and _holds_task(node.args[0]):
            found.append((node.lineno, "looks a task up in a table"))
    return found


def test_the_check_finds_the_branches_it_forbids():
    assert task_branches('if cfg.task == "causal-lm":\n    pass\n')
    assert task_branches('x = info.task in ("classification", "embedding")\n')
    assert task_branches('cols = {"causal-lm": 1, "embedding": 2}.get(metrics["task"])\n')
    assert task_branches('head = HEADLINE[metrics["task"]]\n')
    assert task_branches('BOTH = frozenset({"classification", "token-classification"})\n')
    assert task_branches('if task != "embedding":\n    pass\n')
    assert not task_branches('t = get_task(cfg.task)\nif t.predictor is None:\n    pass\n')
    assert not task_branches('body = {"embedding": vector}\nmeta = {"task": cfg.task}\nv = reply["embedding"]\n')


def test_no_code_outside_the_tasks_branches_on_a_task():
    outside = [p for p in sorted(PACKAGE.rglob("*.py"))
               if "tasks" not in p.relative_to(PACKAGE).parts and p != PACKAGE / "task.py"]
    assert len(outside) > 30
    hits = [f"{p.relative_to(PACKAGE.parent)}:{line}: {what}" for p in outside
            for line, what in task_branches(p.read_text(encoding="utf-8"))]
    assert hits == []


def test_every_built_in_task_is_one_module_with_one_task():
    for name, module in BUILTIN_MODULES.items():
        task = get_task(name)
        assert task.name == name
        assert (PACKAGE / "tasks" / (module.rsplit(".", 1)[1] + ".py")).is_file()
        assert task.run is not None and task.headline and task.term_units
        assert any(task.applies(t.family) for t in TERMS.values())  # some loss term serves it
    with pytest.raises(ValueError, match="unknown task 'nope'; known: classification"):
        get_task("nope")


def test_a_model_dir_without_kdistill_json_is_claimed_by_its_task(tmp_path):
    assert guess_task({"architectures": ["BertForTokenClassification"]}).name == "token-classification"
    assert guess_task({"architectures": ["GPT2LMHeadModel"]}).name == "causal-lm"
    assert guess_task({"architectures": ["BertForSequenceClassification"]}).name == "classification"
    (tmp_path / "modules.json").write_text("[]")
    assert guess_task({"architectures": ["BertModel"]}, tmp_path).name == "embedding"


# ------------------------------------------------------------------------------------ a task defined in a test

LONG_WORDS = 5


def load_lengths(data_cfg):
    """The toy task's data: texts only (JSON lines), each labeled by its length: "long" from LONG_WORDS words."""
    texts = [json.loads(line)["text"] for line in Path(data_cfg.train_file).read_text().splitlines()]
    labeled = Path(data_cfg.train_file).with_suffix(".labeled.csv")
    with open(labeled, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["text", "label"])
        writer.writeheader()
        writer.writerows({"text": t, "label": "long" if len(t.split()) >= LONG_WORDS else "short"} for t in texts)
    return load_data(data_cfg.model_copy(update={"train_file": str(labeled)}))


@pytest.fixture
def length_task():
    """A task that exists only here: classification's heads and terms, its own data and headline."""
    task = register(replace(get_task("classification"), name="toy-length", headline=("accuracy",),
                            summary="Is a text long or short?", load_data=load_lengths,
                            data_for_model=lambda model_dir, info, data_cfg, spec: load_lengths(data_cfg)))
    yield task
    unregister(task.name)


def test_a_task_defined_in_a_test_runs_end_to_end(length_task, tmp_path, tiny_tokenizer):
    words = "the a cat dog sat ran on mat far home".split()
    texts = [" ".join(words[(i * 3 + j) % len(words)] for j in range(2 + i % 6)) for i in range(60)]
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    recipe = scratch_teacher_recipe(tmp_path, tiny_tokenizer, {"train_file": str(data), "max_length": 16},
                                    task="toy-length")
    assert "toy-length" in task_names()
    run_dir = run(load_config(recipe), tmp_path / "run")

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["task"] == "toy-length" and set(metrics["models"]) == {"teacher", "student", "baseline"}
    assert json.loads((run_dir / "student" / "kdistill.json").read_text())["task"] == "toy-length"
    assert (run_dir / "report.md").is_file()
    evaluated = evaluate_dir(run_dir / "student", str(data), out=tmp_path / "eval.json")
    assert evaluated["task"] == "toy-length" and 0.0 <= evaluated["accuracy"] <= 1.0
    predictions = load_predictor(run_dir / "student").predict(["the cat sat", "the a cat dog sat ran on mat"])
    assert {p["label_name"] for p in predictions} <= {"long", "short"}


def test_an_installed_package_adds_a_task_through_its_entry_point(tmp_path):
    """A plugin's task (entry point group kdistill.tasks) is known in a new process: `kdistill validate` takes it."""
    (tmp_path / "toy_plugin.py").write_text(
        "from dataclasses import replace\nfrom kdistill.task import get_task\n"
        "TASK = replace(get_task('classification'), name='toy-plugin', summary='A plugin task.')\n")
    dist = tmp_path / "toy_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[kdistill.tasks]\ntoy-plugin = toy_plugin\n")
    recipe = write_recipe(tmp_path / "plugin.yaml", {"task": "toy-plugin", "data": {"dataset": "bbc-news"}})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "kdistill.cli", "validate", str(recipe)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "task: toy-plugin" in done.stdout
    unknown = subprocess.run([sys.executable, "-m", "kdistill.cli", "validate", str(recipe)], capture_output=True,
                             text=True, timeout=300)  # without the plugin on the path
    assert unknown.returncode == 2 and "unknown task 'toy-plugin'" in unknown.stderr
