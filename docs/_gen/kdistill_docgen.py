"""The generated pages of the docs site, rendered from the code at build time (docs/_gen/hooks.py calls these).

Never edit their output by hand: change the code (a field's docstring, a verb's help, a recipe's comment) and the
next `mkdocs build` shows it. Imports only light modules: kdistill.config (which reads kdistill.terms) and the typer
app of kdistill.cli. No model, no data, no network.
"""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path

import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("This page is generated from the code at each docs build ({source}); do not edit it by hand.")


# ------------------------------------------------------------------------------------------------- markdown

_SPECIAL = re.compile(r"([\\*\[\]|<>])")


def md(text: str) -> str:
    """Plain text -> Markdown that shows it as written: code spans kept, the rest's special characters escaped,
    one line (for table cells)."""
    text = " ".join(str(text).split())
    parts = text.split("`")
    if len(parts) % 2 == 0:  # an unpaired backtick: escape everything
        parts = [text.replace("`", "\\`")]
    out = []
    for i, part in enumerate(parts):
        if i % 2:
            out.append(f"`{part}`")
        else:
            out.append(_SPECIAL.sub(lambda m: "&lt;" if m.group(1) == "<" else "&gt;" if m.group(1) == ">"
                                    else "\\" + m.group(1), part))
    return "".join(out)


def code(text: str) -> str:
    """An inline code span that holds `text` whatever backticks it contains; safe in a table cell."""
    text = str(text).replace("|", "\\|")
    fence = "``" if "`" in text else "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ config reference

def type_name(annotation) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is typing.Literal:
        return " | ".join(repr(a) if not isinstance(a, str) else a for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin in (list, tuple, set, frozenset):
        return f"list[{', '.join(type_name(a) for a in args)}]" if args else "list"
    if origin is dict:
        return f"dict[{', '.join(type_name(a) for a in args)}]" if args else "dict"
    return getattr(annotation, "__name__", str(annotation))


def constraints(field) -> str:
    signs = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<", "min_length": "length ≥", "max_length": "length ≤"}
    out = []
    for meta in field.metadata:
        for attr, sign in signs.items():
            value = getattr(meta, attr, None)
            if value is not None:
                out.append(f"{sign} {value}")
    return ", ".join(out)


def yaml_value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10_000).strip()


def section_model(annotation):
    """The pydantic model a field holds (directly or as `Model | None`), else None."""
    from pydantic import BaseModel

    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def field_default(field):
    if field.default_factory is not None:
        return field.default_factory()
    return field.default


def config_rows(model, prefix: str = "") -> list[list[str]]:
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        sub = section_model(field.annotation)
        default = field_default(field)
        if sub is not None and default is not None and not isinstance(default, sub):
            sub = None
        if sub is not None and default is not None:  # a section that is always there: its keys, one by one
            rows += config_rows(sub, f"{key}.")
            continue
        kind = type_name(field.annotation)
        limits = constraints(field)
        if limits:
            kind += f" ({limits})"
        doc = field.description or ""
        if sub is not None:  # an optional sub-section (None by default): its keys below
            doc = (doc + " " if doc else "") + f"A mapping of the keys `{key}.*` below, or null."
        shown = "(required)" if field.is_required() else code(yaml_value(default))
        rows.append([code(key), md(kind), shown, md(doc)])
        if sub is not None:
            rows += config_rows(sub, f"{key}.")
    return rows


def config_reference() -> str:
    from kdistill.config import RunConfig

    out = ["# Config keys\n", GENERATED.format(source="the pydantic models of `kdistill/config.py`, walked from "
                                               "`RunConfig`") + "\n",
           "A recipe is YAML with these keys; `--set key=value` overrides one on the command line (the value is "
           "read as YAML: `--set student.layers=[0,5]`). An unknown key or a bad value stops with a one-line "
           "error naming the key (exit code 2). `kdistill validate RECIPE` prints the resolved config.\n"]
    top = [[code(name), md(type_name(f.annotation)), code(yaml_value(field_default(f))), md(f.description or "")]
           for name, f in RunConfig.model_fields.items() if section_model(f.annotation) is None]
    out.append("## Top level\n")
    out.append(table(["key", "type", "default", "meaning"], top))
    for name, f in RunConfig.model_fields.items():
        sub = section_model(f.annotation)
        if sub is None:
            continue
        out.append(f"## `{name}`\n")
        if sub.__doc__ and sub.__doc__.strip() and "Usage docs" not in sub.__doc__:
            out.append(md(sub.__doc__) + "\n")
        out.append(table(["key", "type", "default", "meaning"], config_rows(sub, f"{name}.")))
    return "\n".join(out)


# --------------------------------------------------------------------------------------------- CLI reference

def cli_reference() -> str:
    import typer
    import typer.main

    from kdistill.cli import app

    group = typer.main.get_command(app)
    root = typer.Context(group, info_name="kdistill")
    out = ["# Command line\n",
           GENERATED.format(source="the typer app of `kdistill/cli.py`: each verb's docstring and options") + "\n",
           md(group.help or "") + "\n",
           "Every verb is also a Python function of the same arguments ([Python API](../python-api.md)). Exit "
           "codes: 0 success, 2 bad input or configuration (one line on stderr), 1 internal error "
           "(`KDISTILL_DEBUG=1` shows the traceback). `python -m kdistill.cli` runs the same CLI.\n",
           table(["verb", "what it does"],
                 [[f"[`{name}`](#kdistill-{name})", md((cmd.help or "").split(". ")[0].rstrip("."))]
                  for name, cmd in group.commands.items()])]
    for name, cmd in group.commands.items():
        ctx = typer.Context(cmd, info_name=name, parent=root)
        out.append(f"## kdistill {name} {{#kdistill-{name}}}\n")
        out.append(md(cmd.help or "") + "\n")
        out.append("```text\n" + cmd.get_usage(ctx).strip() + "\n```\n")
        rows = []
        for param in cmd.params:
            record = param.get_help_record(ctx)
            if record is None:
                continue
            spelled, help_text = record
            rows.append([code(spelled), md(help_text)])
        if rows:
            out.append(table(["argument / option", "meaning"], rows))
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ recipe reference

def recipe_parts(text: str) -> tuple[list[str], str]:
    """(the opening comment's lines without their '# ', the rest of the file)."""
    lines = text.splitlines()
    head = []
    for i, line in enumerate(lines):
        if not line.startswith("#"):
            return head, "\n".join(lines[i:]).strip() + "\n"
        head.append(line[2:] if line.startswith("# ") else line[1:])
    return head, ""


def comment_markdown(lines: list[str]) -> str:
    """Prose lines as one paragraph each run; indented lines (commands) as a code block."""
    out, prose, commands = [], [], []

    def flush():
        if prose:
            out.append(md(" ".join(prose)) + "\n")
            prose.clear()
        if commands:
            out.append("```bash\n" + "\n".join(commands) + "\n```\n")
            commands.clear()

    for line in lines:
        if line.startswith((" ", "\t")) or (commands and not line.strip()):
            if prose:
                flush()
            commands.append(line.strip() if not line.startswith("    ") else "    " + line.strip())
        else:
            if commands:
                flush()
            prose.append(line)
    flush()
    return "\n".join(out)


def recipe_keys(raw: dict, model, prefix: str = "") -> list[list[str]]:
    rows = []
    for key, value in raw.items():
        field = model.model_fields.get(key) if model is not None else None
        sub = section_model(field.annotation) if field is not None else None
        if isinstance(value, dict) and sub is not None:
            rows += recipe_keys(value, sub, f"{prefix}{key}.")
        else:
            section = prefix.split(".")[0] if prefix else "top-level"
            rows.append([f"[{code(prefix + key)}](config.md#{section})", code(yaml_value(value))])
    return rows


def recipes_reference() -> str:
    from kdistill.config import RunConfig, recipe_dir

    files = sorted((f for f in recipe_dir().iterdir() if f.name.endswith(".yaml")), key=lambda f: f.name)
    out = ["# Recipes\n",
           GENERATED.format(source="every `kdistill/recipes/*.yaml`: its opening comment and its keys") + "\n",
           "A recipe is a YAML file of [config keys](config.md). These ship with kdistill: `kdistill recipes` "
           "lists them, `kdistill run NAME` runs one, `kdistill validate NAME` prints it resolved, and "
           "`--set key=value` overrides any key. Keys a recipe does not set take the defaults of the "
           "[config reference](config.md).\n"]
    summary = []
    details = []
    for f in files:
        name = f.name.removesuffix(".yaml")
        text = f.read_text(encoding="utf-8")
        head, body = recipe_parts(text)
        command = head[0].strip() if head and head[0].strip().startswith("kdistill") else ""
        description = head[1:] if command else head
        raw = yaml.safe_load(text) or {}
        prose = " ".join(line.strip() for line in description if not line.startswith((" ", "\t")))
        first = re.split(r"(?<=[.])\s+(?=[A-Z])", prose, maxsplit=1)[0]
        summary.append([f"[`{name}`](#{name})", code(raw.get("task", "classification")), md(first)])
        details.append(f"## {name} {{#{name}}}\n")
        if command:
            details.append("```bash\n" + command + "\n```\n")
        details.append(comment_markdown(description))
        details.append(table(["key", "value"], recipe_keys(raw, RunConfig)))
        details.append(f"??? note \"{f.name}\"\n\n" + "\n".join("    " + ln if ln else "" for ln in
                                                                  ("```yaml\n" + body + "```").splitlines()) + "\n")
    out.append(table(["recipe", "task", "what it shows"], summary))
    out += details
    return "\n".join(out)


# ----------------------------------------------------------------------------------- snippets in hand pages

REGISTRY_MODULES = ("kdistill.tasks", "kdistill.task", "kdistill.tasks.registry")
"""Where the task registry's `get_task` may live, the public spelling first."""


def task_registry():
    """The module that defines (or re-exports) `get_task`, the task registry."""
    import importlib

    for name in REGISTRY_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "get_task"):
            return module
    raise ImportError(f"no task registry: none of {', '.join(REGISTRY_MODULES)} defines get_task")


def task_get() -> str:
    """How code looks a task up, spelled as the code has it: `kdistill.tasks.get_task(name)`."""
    return f"`{task_registry().__name__}.get_task(name)`"


def task_protocol() -> str:
    """The file that defines the `Task` protocol."""
    import inspect

    registry = task_registry()
    task_class = getattr(registry, "Task")
    path = Path(inspect.getsourcefile(task_class)).resolve().relative_to(ROOT)
    return f"`{path.as_posix()}`"


def task_modules() -> str:
    """The built-in tasks and their modules, as a table."""
    import importlib

    registry = task_registry()
    modules = getattr(importlib.import_module(registry.Task.__module__), "BUILTIN_MODULES", {})
    rows = [[code(name), code(module.replace(".", "/") + ".py")] for name, module in modules.items()]
    return ("<!-- generated from the task registry at build time -->\n\n"
            + table(["task (a recipe's `task`)", "module"], rows))


def term_unit(term) -> str:
    """What the term's count counts, as its row says (a task module may say it for the term's family instead;
    looking that up would import the task modules, which this page does not)."""
    unit = getattr(term, "unit", None)
    if isinstance(unit, str):
        return unit
    if isinstance(unit, dict):
        return ", ".join(f"{task}: {u}" for task, u in unit.items())
    return "set by the task"


def term_example() -> str:
    """The worked example of kdistill/terms.py's docstring (its `::` block), as a Python code block."""
    import textwrap

    from kdistill import terms

    doc = terms.__doc__ or ""
    match = re.search(r"::\n\n((?:[ \t]+.*\n|\n)+)", doc)
    if not match:
        raise ValueError("kdistill/terms.py: its docstring no longer holds a '::' example of adding a term")
    return "```python\n" + textwrap.dedent(match.group(1)).strip() + "\n```\n"


def terms_table() -> str:
    """The table of loss terms (kdistill/terms.py TERMS): name, unit, what it reads, cacheable, tasks, what it is."""
    from kdistill.terms import TERMS

    rows = []
    for name, term in TERMS.items():
        unit = term_unit(term)
        reads = ", ".join(sorted(getattr(term, "reads", ()))) or "nothing (labels or data only)"
        doc = (getattr(getattr(term, "fn", None), "__doc__", None) or "").strip()
        doc = " ".join(doc.split())
        first = re.split(r"(?<=[.)])\s+(?=[A-Z(])", doc, maxsplit=1)[0] if doc else ""
        rows.append([code(name), md(first), md(getattr(term, "family", "") or "–"), md(unit), md(reads),
                     "yes" if getattr(term, "cacheable", False) else "no"])
    return ("<!-- generated from kdistill/terms.py TERMS at build time -->\n\n"
            + table(["term", "what it computes", "family", "count unit", "reads from the teacher", "cacheable"],
                    rows))


def import_layers() -> str:
    """The layers of pyproject.toml's import-linter contract, top to bottom."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    contracts = config.get("tool", {}).get("importlinter", {}).get("contracts", [])
    out = ["<!-- generated from pyproject.toml [tool.importlinter] at build time -->\n"]
    for contract in contracts:
        out.append(f"**{md(contract.get('name', ''))}** (`{contract.get('type', '')}`)\n")
        if contract.get("type") == "layers":
            out.append("```text\n" + "\n".join(layer.replace("kdistill.", "") for layer in contract["layers"])
                       + "\n```\n")
        elif contract.get("ancestors"):
            out.append("Packages: " + ", ".join(f"`{a}`" for a in contract["ancestors"]) + "\n")
    return "\n".join(out)


def _annotation(annotation) -> str:
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if annotation is type(None):
        return "None"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_annotation(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_annotation(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


def python_api() -> str:
    """Each verb of kdistill/cli.py as a Python function: its signature and its first docstring line."""
    import inspect

    from kdistill import cli

    try:
        import kdistill

        verbs = list(getattr(kdistill, "VERBS"))
    except AttributeError:
        verbs = ["run", "train_teacher", "teacher_signal", "distill", "evaluate", "report", "export", "predict",
                 "serve", "recipes", "datasets", "validate"]
    out = ["<!-- generated from the verbs of kdistill/cli.py at build time -->\n"]
    for name in verbs:
        fn = getattr(cli, name, None)
        if fn is None:
            continue
        hints = typing.get_type_hints(fn, include_extras=True)
        params = []
        for pname, param in inspect.signature(fn).parameters.items():
            text = f"{pname}: {_annotation(hints.get(pname, param.annotation))}"
            if param.default is not inspect.Parameter.empty:
                text += f" = {param.default!r}"
            params.append(text)
        returns = _annotation(hints["return"]) if "return" in hints else "None"
        doc = " ".join((fn.__doc__ or "").split())
        out.append(f"### `kdistill.{name}`\n")
        out.append("```python\n" + f"kdistill.{name}(" + ", ".join(params) + f") -> {returns}" + "\n```\n")
        out.append(md(doc) + "\n")
    return "\n".join(out)


SNIPPETS = {"terms": terms_table, "term-example": term_example, "import-layers": import_layers,
            "python-api": python_api, "task-get": task_get, "task-protocol": task_protocol,
            "task-modules": task_modules}
"""`<!-- gen:NAME -->` in a hand-written page is replaced by SNIPPETS[NAME]() at build time."""

PAGES = {"reference/config.md": config_reference, "reference/cli.md": cli_reference,
         "reference/recipes.md": recipes_reference}
"""Generated pages: path under docs/ -> renderer."""
