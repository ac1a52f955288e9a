"""report.md + plots/*.png from one or more run dirs: the comparison a person reads.

The report leads with one table (quality, size, speed, and the ratios against the teacher), then the plots:
training curves per loss term, accuracy against latency and against size for every model, and the student's
confusion matrix (its most confused classes, when there are many). With several run dirs (e.g. one per strategy)
every model of every run is a row. A plot that fails is logged and left out: the report is still written.
A task with a report of its own (tasks/causal_lm.py, tasks/instruction.py: `Task.report`) builds it from the
pieces here (summary_table, student_line, budget_line, the plots, including the causal-LM curves and size
trade-off).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # headless: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

from kdistill.errors import UserError  # noqa: E402
from kdistill.io import atomic_write_text  # noqa: E402
from kdistill.task import DEFAULT_TASK, get_task  # noqa: E402

log = logging.getLogger(__name__)

CONFUSION_MAX_CLASSES = 30
"""The most classes a confusion plot shows (the most confused ones): cells stay readable and the canvas (and its
memory) stays the same size whatever the number of classes; at 600 classes one cell per class needed ~20 GB."""

COLUMNS = [
    ("accuracy", "accuracy", "{:.2%}"),
    ("macro_f1", "macro-F1", "{:.4f}"),
    ("params", "params", "{:,}"),
    ("size_mb", "MB", "{:.1f}"),
    ("latency_ms_batch1", "latency b=1 (ms)", "{:.2f}"),
    ("throughput_per_s", "throughput b=32 (/s)", "{:.1f}"),
    ("speedup_vs_teacher", "speed-up", "{:.2f}x"),
    ("size_ratio_vs_teacher", "size ratio", "{:.2f}x"),
    ("accuracy_retained_pct", "acc. retained", "{:.1f}%"),
    ("train_wall_time_s", "train time (s)", "{:.0f}"),
]

SIZE_AND_SPEED_COLUMNS = COLUMNS[COLUMNS.index(("params", "params", "{:,}")):COLUMNS.index(
    ("accuracy_retained_pct", "acc. retained", "{:.1f}%"))]
"""params, MB, latency, throughput, speed-up and size ratio: the columns every encoder task's table shows."""

EMBEDDING_COLUMNS = [  # sentence-embedding runs (metrics.json "task": "embedding")
    ("spearman_agreement", "Spearman vs teacher", "{:.4f}"),
    ("recall_at_10", "recall@10", "{:.3f}"),
    ("knn_accuracy", "k-NN acc.", "{:.2%}"),
    ("dim", "dim", "{}"),
    *SIZE_AND_SPEED_COLUMNS,
    ("train_wall_time_s", "train time (s)", "{:.0f}"),
]


def load_run(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise UserError(f"{run_dir}: no metrics.json (is this a finished run dir?)")
    metrics = json.loads(path.read_text(encoding="utf-8"))
    histories = {}
    for f in sorted((Path(run_dir) / "logs").glob("history_*.json")):
        h = json.loads(f.read_text(encoding="utf-8"))
        histories[h["name"]] = h
    return {"dir": Path(run_dir), "metrics": metrics, "histories": histories}


def format_cell(value, pattern: str) -> str:
    if value is None:
        return "–"
    try:
        return pattern.format(value)
    except (ValueError, TypeError):
        return str(value)


TOKEN_COLUMNS = [  # token-classification runs (metrics.json "task": "token-classification")
    ("entity_f1", "entity F1", "{:.4f}"),
    ("entity_precision", "entity P", "{:.4f}"),
    ("entity_recall", "entity R", "{:.4f}"),
    ("token_accuracy", "token acc.", "{:.2%}"),
    *SIZE_AND_SPEED_COLUMNS,
    ("entity_f1_retained_pct", "F1 retained", "{:.1f}%"),
    ("train_wall_time_s", "train time (s)", "{:.0f}"),
]


def entity_type_table(run: dict) -> str:
    """Token classification: entity F1 per type (seqeval), one column per model of the run."""
    models = run["metrics"]["models"]
    types = sorted({t for m in models.values() for t in m.get("per_type", {})})
    lines = ["| entity type | support | " + " | ".join(f"{name} F1" for name in models) + " |",
             "|" + "---|" * (len(models) + 2)]
    for t in types:
        support = next((m["per_type"][t]["support"] for m in models.values() if t in m.get("per_type", {})), 0)
        cells = [format_cell(m.get("per_type", {}).get(t, {}).get("f1"), "{:.4f}") for m in models.values()]
        lines.append(f"| {t} | {support} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def weak_teacher_warning(metrics: dict) -> str | None:
    """A sentence saying that the run's teacher is weak, or None: it scores below the no-KD baseline on the task's
    headline metric (entity F1 where the models have it, else accuracy), or near chance (accuracy at most 1.5 / the
    number of classes; entity F1 at most 0.2). A "retained" above 100% then means that the student passed a weak
    teacher, not that distillation did better than its source."""
    models = metrics.get("models", {})
    teacher = models.get("teacher", {})
    key = "entity_f1" if "entity_f1" in teacher else "accuracy"
    score, label = teacher.get(key), "entity F1" if key == "entity_f1" else "accuracy"
    if score is None:
        return None
    reasons = []
    baseline = models.get("baseline", {}).get(key)
    if baseline is not None and score < baseline:
        reasons.append(f"scores below the student trained without KD ({label} {score:.4f} < {baseline:.4f})")
    n_classes = len(metrics.get("data", {}).get("labels") or [])
    chance = 0.2 if key == "entity_f1" else 1.5 / n_classes if n_classes else None
    if chance is not None and score <= chance:
        reasons.append(f"is near chance ({label} {score:.4f}, at most {chance:.4f}"
                       + (f" = 1.5 / {n_classes} classes)" if key == "accuracy" else ")"))
    if not reasons:
        return None
    return (f"**Weak teacher** ({metrics.get('run', 'run')}): the teacher {' and '.join(reasons)}. Distilling from it "
            "teaches little; a \"retained\" above 100% below means the student passed a weak teacher, not that it "
            "learned more than the teacher knew. Train the teacher longer or pick a stronger one.")


STOPPED = {"budget": "its planned steps", "patience": "validation stopped improving", "time": "its time cap"}


def budget_line(metrics: dict) -> str | None:
    """One line saying how long each model trained, the step of its best validation score (the weights kept) and
    why it stopped (metrics.json models.*.training); None when no model records it."""
    parts = []
    for name, m in metrics.get("models", {}).items():
        t = m.get("training")
        if not t or t.get("steps_run") is None:
            continue
        best = f", best validation at step {t['best_step']:,}" if t.get("best_step") else ""
        parts.append(f"{name} {t['steps_run']:,} of {t['planned_steps']:,} planned steps{best} "
                     f"(ended by {STOPPED.get(t['stopped'], t['stopped'])})")
    return f"Training ({metrics.get('run', 'run')}): " + "; ".join(parts) + "." if parts else None


def summary_table(runs: list[dict]) -> str:
    many = len(runs) > 1
    columns = get_task(runs[0]["metrics"].get("task", DEFAULT_TASK)).report_columns or COLUMNS
    head = "| model | " + " | ".join(label for _, label, _ in columns) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 1)]
    for run in runs:
        for name, m in run["metrics"]["models"].items():
            label = f"{run['metrics']['run']}/{name}" if many else name
            lines.append(f"| {label} | " + " | ".join(format_cell(m.get(k), p) for k, _, p in columns) + " |")
    return "\n".join(lines)


def save_figure(fig, path: Path, title: str | None = None) -> Path:
    """Lay out, title, write and close `fig`; returns `path`."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


NOT_A_TERM = ("step", "lr", "temperature", "on_policy", "seq_kd")
"""Keys of a history's step records that are not loss values: the step, and what a strategy logs beside the terms."""

CURVE_SMOOTHING_FRACTION = 0.05
"""A training curve's trend line averages over about this share of its points (`smoothed`'s span): some 20
independent stretches, whatever the number of steps."""


def curve_points(steps: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(optimizer steps, values) of `key` in a history's step records, where a log axis can show them: a step that did
    not record `key` is skipped (the engine leaves out a term that nothing in the step counted, e.g. ce on a group of
    unlabeled transfer rows), and so is a value the axis cannot show: not finite, or not above 0 (e.g. an uncounted
    term logged as 0). The line then joins the counted steps instead of dropping to the axis at the others."""
    points = [(s["step"], float(s[key])) for s in steps
              if s.get(key) is not None and np.isfinite(s[key]) and s[key] > 0]
    return [step for step, _ in points], [value for _, value in points]


def smoothed(values: list[float], span: float | None = None) -> list[float]:
    """The trend of a positive curve: an exponential moving average of log(value), mapped back (a running geometric
    mean: even on a log axis, not dragged up by single spikes).

    out_t = exp(Σ_i w^i · log v_(t-i) / Σ_i w^i),  w = 1 − 2 / (span + 1),  i = 0 .. t

    Each point is the weighted mean of the values so far (pandas' ewm(span=span, adjust=True)), so the start is not
    pulled towards the first value. span ≈ the number of points averaged; by default CURVE_SMOOTHING_FRACTION of
    the points, at least 1 (w = 0: the values unchanged)."""
    if span is None:
        span = max(1.0, CURVE_SMOOTHING_FRACTION * len(values))
    keep = 1.0 - 2.0 / (span + 1.0)
    out, total, weight = [], 0.0, 0.0
    for value in values:
        total, weight = keep * total + float(np.log(value)), keep * weight + 1.0
        out.append(float(np.exp(total / weight)))
    return out


def draw_curve(ax, steps: list[int], values: list[float], label: str) -> None:
    """One curve (`curve_points`): its value at each step as a faint line, its `smoothed` trend over it, one colour."""
    raw, = ax.plot(steps, values, lw=0.8, alpha=0.3)
    ax.plot(steps, smoothed(values), lw=1.6, color=raw.get_color(), label=label)


def plot_curves(run: dict, path: Path) -> Path | None:
    """Each history's loss terms per optimizer step (`curve_points`, drawn by `draw_curve`), log scale, with its
    validation accuracy."""
    histories = [h for h in run["histories"].values() if h["steps"]]
    if not histories:
        return None
    fig, axes = plt.subplots(1, len(histories), figsize=(5 * len(histories), 3.6), squeeze=False)
    for ax, h in zip(axes[0], histories):
        terms = dict.fromkeys(k for s in h["steps"] for k in s if k not in NOT_A_TERM)  # (a term may skip steps)
        for term in terms:
            steps, values = curve_points(h["steps"], term)
            if steps:
                draw_curve(ax, steps, values, term)
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_title(h["name"])
        if h["evals"]:
            ax2 = ax.twinx()
            ax2.plot([e["step"] for e in h["evals"]], [e["accuracy"] for e in h["evals"]], "k--o", ms=3,
                     label="val accuracy")
            ax2.set_ylabel("validation accuracy")
        ax.legend(fontsize=7, loc="upper right")
    return save_figure(fig, path, "training loss per term (log scale) and validation accuracy\n"
                                  "faint: each step; solid: moving average (of the log)")


def plot_tradeoff(runs: list[dict], path: Path) -> Path:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    many = len(runs) > 1
    for run in runs:
        for name, m in run["metrics"]["models"].items():
            label = f"{run['metrics']['run']}/{name}" if many else name
            for ax, key in ((ax1, "latency_ms_batch1"), (ax2, "size_mb")):
                if m.get(key) is not None:
                    ax.scatter(m[key], m["accuracy"], s=40)
                    ax.annotate(label, (m[key], m["accuracy"]), fontsize=8, xytext=(4, 4),
                                textcoords="offset points")
    ax1.set_xlabel("CPU latency, batch 1 (ms)")
    ax2.set_xlabel("size on disk (MB)")
    for ax in (ax1, ax2):
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    return save_figure(fig, path, "accuracy against latency and size (up and to the left is better)")


def most_confused(cm, k: int) -> list[int]:
    """The indices of the (at most) `k` classes with the most errors, counting those on a class (its row) and into
    it (its column), in class order; ties go to the lower index."""
    cm = np.asarray(cm)
    if len(cm) <= k:
        return list(range(len(cm)))
    errors = cm.sum(axis=0) + cm.sum(axis=1) - 2 * np.diag(cm)
    return sorted(int(i) for i in np.argsort(-errors, kind="stable")[:k])


def _short(label: str, width: int = 24) -> str:
    return label if len(label) <= width else label[: width - 1] + "…"


def plot_confusion(run: dict, model: str, path: Path) -> Path | None:
    m = run["metrics"]["models"].get(model)
    if not m or "confusion_matrix" not in m:
        return None
    labels = run["metrics"]["data"]["labels"]
    cm = np.asarray(m["confusion_matrix"])
    shown = most_confused(cm, CONFUSION_MAX_CLASSES)
    cm, names = cm[np.ix_(shown, shown)], [_short(str(labels[i])) for i in shown]
    k = len(shown)
    fig, ax = plt.subplots(figsize=(min(1.2 * k + 2, 16), min(1.0 * k + 1.5, 14)))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(k), names, rotation=45, ha="right")
    ax.set_yticks(range(k), names)
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=8 if k <= 15 else 6)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    which = f", the {k} most confused of {len(labels)} classes" if k < len(labels) else ""
    ax.set_title(f"{model}: confusion matrix (test{which})")
    return save_figure(fig, path)


def draw_or_skip(plot, *args) -> Path | None:
    """`plot(*args)` (its last argument: the file), or None when it fails. The report is written after all training:
    a plot that cannot be drawn is logged and left out of it, never the reason a finished run fails."""
    open_before = set(plt.get_fignums())
    try:
        return plot(*args)
    except Exception as e:  # MemoryError included: a plot may be the largest allocation of the whole run
        log.warning("report: plot %s skipped (%s: %s)", Path(args[-1]).name, type(e).__name__, e)
        for num in set(plt.get_fignums()) - open_before:
            plt.close(num)
        Path(args[-1]).unlink(missing_ok=True)  # no half-written image
        return None


def student_line(shape: dict) -> str:
    """The student's shape against the teacher's (metrics.json "student_shape"; with student.trim_vocab, the
    vocabulary it kept), one line of the report; where student.layer_map importance chose the layers, a paragraph
    with every teacher block's Block Influence follows."""
    s, t = shape["student"], shape["teacher"]
    init = shape.get("init")
    scores = init.get("block_influence") if isinstance(init, dict) else None
    if scores is not None:  # a list as long as the teacher: its own paragraph, not inside the init's dict
        init = {k: v for k, v in init.items() if k != "block_influence"}
    if t is None:  # a teacher behind an endpoint: its shape is not known here
        detail = f", {s['heads']} heads, FFN {s['ffn']}, {s['params']:,} parameters (the teacher's shape is unknown)"
    elif "student_block_params" in shape:  # causal LM: its transformer blocks, the shared embeddings aside
        detail = (f" (teacher: {t['layers']} x {t['hidden']}); block parameters {shape['student_block_params']:,} "
                  f"vs {shape['teacher_block_params']:,} ({shape['block_param_ratio']:.1%})")
    else:
        detail = (f", {s['heads']} heads, FFN {s['ffn']} (teacher: {t['layers']} x {t['hidden']}, {t['heads']} "
                  f"heads, FFN {t['ffn']})")
    vocab = shape.get("vocab")  # student.trim_vocab
    if vocab:
        detail += (f"; vocabulary trimmed to {vocab['student']:,} of {vocab['teacher']:,} tokens, those of its "
                   f"training texts ({vocab['params_before']:,} -> {vocab['params_after']:,} parameters)")
    line = f"Student: {s['layers']} layers x {s['hidden']} hidden{detail}; init {init}."
    if scores is None:
        return line
    kept = set(init["teacher_layers"])
    ranking = ", ".join(f"**{i}: {b:.4f}**" if i in kept else f"{i}: {b:.4f}" for i, b in enumerate(scores))
    return (f"{line}\n\nBlock Influence per teacher block (ShortGPT: 1 − mean cos(block input, block output) over "
            f"the calibration tokens; the kept blocks in bold): {ranking}.")


def write_report(run_dirs: list[str | Path], out_dir: str | Path | None = None,
                 peers: list[str | Path] | None = None) -> Path:
    """Write report.md and plots/ into `out_dir` (default: the first run dir), as the runs' task lays it out
    (Task.report); `peers`: tables of benchmarks/peers whose systems join the runs' models (`load_peers`); returns
    the report path."""
    runs = [load_run(d) for d in run_dirs]
    task = runs[0]["metrics"].get("task", DEFAULT_TASK)
    runs += [load_peers(p, task) for p in peers or []]
    out = Path(out_dir) if out_dir else runs[0]["dir"]
    return get_task(task).report(runs, out)


def load_peers(path: str | Path, task: str) -> dict:
    """A peers table (benchmarks/peers writes <out>/<table>/peers.json: the file or its dir) as one more run of the
    report: the tools' systems, each with the quality, size and speed keys of a run's models, so the summary table
    and the trade-off plot set them beside the runs' teacher, student and no-KD student. kdistill's own rows are
    left out (the runs given are the ones to compare); a system that failed keeps its row, empty, named so."""
    file = Path(path) / "peers.json" if Path(path).is_dir() else Path(path)
    try:
        table = json.loads(file.read_text(encoding="utf-8"))
        models, table_task = table["models"], table["task"]
        same = get_task(table_task) is get_task(task)  # (ValueError: a task kdistill does not know)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--peers {path}: not a peers table (benchmarks/peers writes <out>/<table>/peers.json): "
                        f"{e}") from None
    if not same:
        raise UserError(f"--peers {path}: a table of {table_task} systems, the runs are {task}; give a table of "
                        "the same task")
    shown = {(f"{name} (failed)" if m.get("failed") else name): m
             for name, m in models.items() if m.get("system") != "kdistill"}
    name = table.get("table", file.parent.name)
    return {"dir": file.parent, "histories": {},
            "metrics": {"run": name, "task": task, "data": table.get("data", {}), "models": shown}}


def entity_sections(runs: list[dict]) -> list[str]:
    """Token classification's part of the report: entity-level scores (seqeval, strict IOB2) per type."""
    lines = ["Entity F1: seqeval's strict IOB2 matching (type and both boundaries exact), micro-averaged over "
             "entities; token accuracy over the scored sub-tokens (each word's first).", ""]
    for run in runs:
        lines += [f"## Entity F1 per type ({run['metrics']['run']})", "", entity_type_table(run), ""]
    return lines


def llm_teacher_lines(metrics: dict) -> list[str]:
    """A run whose teacher is a prompted LLM (metrics.json "llm_teacher"): its own test scores and its cost per
    1,000 texts beside the student's; [] for any other run."""
    llm = metrics.get("llm_teacher")
    if not llm:
        return []
    measure = "CPU" if llm.get("cpu_cost_ratio") else "wall"  # behind an endpoint the LLM's CPU is not seen
    ratio = llm.get("cpu_cost_ratio") or llm.get("wall_cost_ratio")
    ratio = f"{ratio:,.0f}x" if ratio else "n/a"
    stored = f"{llm['calls']:,} scored in this run, {llm['reused']:,} read from the store"
    if llm.get("endpoint"):
        where = f"behind {llm['endpoint']}, one request per text"
        how = f"the LLM's wall time over {llm['requests']:,} requests against the student's batches of {llm['batch_size']}"
    else:
        where = f"scoring {llm['forwards_per_text']} forward(s) per text"
        how = f"batches of {llm['batch_size']}, {llm['threads']} threads"
    answers = ", ".join(f"{label} = {answer!r}" for label, answer in llm["verbalizers"].items())
    calibration = (f", batch-calibrated: {llm['raw_accuracy']:.2%} before the label prior was taken out"
                   if llm.get("calibration") == "batch" else "")
    return [f"## The LLM teacher ({metrics['run']})", "",
            f"{llm['model']}, {llm['shots']}-shot, answers {answers}: "
            f"accuracy {llm['accuracy']:.2%}, macro-F1 {llm['macro_f1']:.4f} on the {llm['n_test']} test texts "
            f"(the argmax of its answer log-probabilities{calibration}); \"acc. retained\" above is relative to it.", "",
            "| cost per 1,000 texts | CPU s | wall s |", "|---|---|---|",
            f"| LLM ({where}) | {format_cell(llm['cpu_s_per_1000_texts'], '{:.1f}')} | "
            f"{llm['wall_s_per_1000_texts']:.1f} |",
            f"| student | {llm['student_cpu_s_per_1000_texts']:.3f} | {llm['student_wall_s_per_1000_texts']:.3f} |", "",
            f"The LLM costs {ratio} the student's {measure} time per text ({how}). Its scores of "
            f"{llm['texts_scored']:,} texts: {stored}.", ""]


def write_classifier_report(runs: list[dict], out: Path, sections=None) -> Path:
    """A classifier's report (of texts or of tokens): the summary table, then `sections(runs)` (the task's own
    lines, e.g. entity F1 per type), the test set, the student's shape, the trade-off, curves and confusion plots."""
    first = runs[0]["metrics"]
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    lines = [f"# kdistill report: {', '.join(r['metrics']['run'] for r in runs)}", ""]
    lines += [w for run in runs for w in (weak_teacher_warning(run["metrics"]), "") if w]
    lines += [summary_table(runs), ""]
    lines += [line for run in runs for line in llm_teacher_lines(run["metrics"])]
    if sections is not None:
        lines += sections(runs)
    machine = first.get("machine", {})
    lines += [f"Test set: {first['data']['sizes']['test']} examples of {first['data']['source']} "
              f"({len(first['data']['labels'])} classes). Latency and throughput: CPU, "
              f"{machine.get('eval_threads', '?')} threads, medians after warm-up, all models measured "
              f"interleaved in one process. Speed-up and size ratio are relative to the teacher.", ""]
    leak = first["data"].get("leakage", {})
    if leak.get("test_texts_also_in_train"):
        lines += [f"Leakage check: {leak['test_texts_also_in_train']} test texts also appeared in train and were "
                  f"{'removed' if leak.get('removed') else 'KEPT (accuracy is inflated)'}.", ""]
    shape = first.get("student_shape")
    if shape:
        lines += [student_line(shape), ""]
    lines += [b for run in runs for b in (budget_line(run["metrics"]), "") if b]
    trade = draw_or_skip(plot_tradeoff, runs, plots / "tradeoff.png")
    if trade:
        lines += ["## Accuracy against latency and size", "", f"![tradeoff](plots/{trade.name})", ""]
    for run in runs:
        tag = run["metrics"]["run"] if len(runs) > 1 else "run"
        curves = draw_or_skip(plot_curves, run, plots / f"curves_{tag}.png")
        if curves:
            lines += [f"## Training curves ({run['metrics']['run']})", "", f"![curves](plots/{curves.name})", ""]
        cm = draw_or_skip(plot_confusion, run, "student", plots / f"confusion_{tag}.png")
        if cm:
            lines += [f"## Student confusion matrix ({run['metrics']['run']})", "", f"![confusion](plots/{cm.name})",
                      ""]
    exports = first.get("exports")
    if exports:
        lines += ["## Exports (student)", "", "| format | parity / accuracy |", "|---|---|"]
        for fmt, info in exports.items():
            lines.append(f"| {fmt} | `{json.dumps(info.get('parity', info), default=str)[:300]}` |")
        lines.append("")
    report = atomic_write_text(out / "report.md", "\n".join(lines))
    return report


def write_embedding_report(runs: list[dict], out: Path) -> Path:
    """report.md for sentence-embedding runs: the table of agreement, k-NN accuracy and speed, what each number
    means, and the student's shape."""
    first = runs[0]["metrics"]
    data, machine = first["data"], first.get("machine", {})
    some = next(iter(first["models"].values()))
    lines = [f"# kdistill report: {', '.join(r['metrics']['run'] for r in runs)}", "", summary_table(runs), ""]
    lines += [f"Held-out texts: the {some.get('n_held_out', '?')} test texts of {data['source']}. Spearman vs "
              "teacher: rank correlation between the model's and the teacher's cosine similarities of the same "
              "pairs of held-out texts (all pairs, or 20,000 drawn with a fixed seed). recall@10: the share of each "
              "text's 10 nearest held-out neighbours by the teacher that the model also ranks among its 10 nearest.",
              ""]
    if "knn_accuracy" in some:
        lines += [f"k-NN acc.: each test text takes the majority label of its {some.get('knn_k', '?')} most "
                  "cosine-similar training texts (the training split is the index; its labels are never used in "
                  "training).", ""]
    if "baseline" in first["models"]:
        lines += ["baseline = the no-KD control: the same student, not trained at all (its initialisation from the "
                  "teacher's layers, with the teacher's pooling). There are no labels to train it on otherwise.", ""]
    lines += [f"Latency and throughput: CPU, {machine.get('eval_threads', '?')} threads, the encoder's forward "
              "(pooling excluded), medians after warm-up, all models measured interleaved in one process.", ""]
    shape = first.get("student_shape")
    if shape:
        lines += [student_line(shape), ""]
    return atomic_write_text(out / "report.md", "\n".join(lines))


def plot_lm_sizes(points: list[dict], path: Path) -> Path:
    """Test perplexity of the KD student and the no-KD baseline (mean over runs, range as error bars) against the
    students' block parameters and against their batch-1 generation speed, the teacher as a reference."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    teacher_ppl = np.mean([v for p in points for v in p["teacher_perplexity"]])
    for ax, (x_key, x_label) in zip(axes, (("block_params", "transformer-block parameters (millions)"),
                                           ("generate_tokens_per_s", "generation tokens/s, batch 1"))):
        for name, label, style in (("student", "KD student", "o-"), ("baseline", "no-KD baseline", "s--")):
            ys = [p[f"{name}_perplexity"] for p in points]
            xs = ([p["block_params"] / 1e6 for p in points] if x_key == "block_params"
                  else [np.mean([v for v in p[f"{name}_{x_key}"] if v]) for p in points])
            mean = np.array([np.mean(y) for y in ys])
            spread = np.array([[m - min(y), max(y) - m] for m, y in zip(mean, ys)]).T
            ax.errorbar(xs, mean, yerr=spread, fmt=style, capsize=3, label=label)
        teacher_x = (points[0]["teacher_block_params"] / 1e6 if x_key == "block_params"
                     else np.mean([v for p in points for v in p["teacher_generate_tokens_per_s"] if v]))
        ax.scatter([teacher_x], [teacher_ppl], marker="*", s=150, c="k", label="teacher", zorder=3)
        ax.set_xlabel(x_label)
        ax.set_ylabel("test perplexity")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path, "student size and speed against test perplexity (down is better)")


def plot_lm_curves(runs: list[dict], path: Path) -> Path:
    """Training NLL per step, and test perplexity against batch-1 generation speed, for every model of the runs."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    many = len(runs) > 1
    for run in runs:
        for name, h in sorted(run["histories"].items()):
            # the data's NLL where the run has that term (not on its on-policy steps): comparable between KD and no-KD
            key = "lm" if any("lm" in s for s in h["steps"]) else "loss"
            steps, values = curve_points(h["steps"], key)
            if steps:
                draw_curve(ax1, steps, values, (f"{run['metrics']['run']}/{name}" if many else name) + f" ({key})")
        for name, m in run["metrics"]["models"].items():
            if m.get("generate_tokens_per_s") and m.get("perplexity"):
                ax2.scatter(m["generate_tokens_per_s"], m["perplexity"], s=40)
                ax2.annotate(f"{run['metrics']['run']}/{name}" if many else name,
                             (m["generate_tokens_per_s"], m["perplexity"]), fontsize=8, xytext=(4, 4),
                             textcoords="offset points")
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("training NLL on the data (nats/token)")
    ax1.set_title("faint: each step; solid: moving average (of the log)", fontsize=8)
    ax1.set_yscale("log")
    if ax1.lines:  # runs without training histories (e.g. loaded from metrics.json only) draw no curve
        ax1.legend(fontsize=7)
    ax2.set_xlabel("generation tokens/s, batch 1")
    ax2.set_ylabel("test perplexity")
    ax2.set_yscale("log")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    return save_figure(fig, path, "training curves and test perplexity against generation speed")
