"""Task `causal-lm`: a GPT-like decoder learns to continue text.

Data: documents packed into blocks of data.block_size tokens (data.load_lm_corpus). Teacher: a given pretrained
causal LM (built-in alias, model dir, GGUF file or hub id), frozen. Student: layers (and widths) of the teacher,
or a student.model, with the teacher's tokenizer or its own (then the cross-tokenizer terms uld / aligned_kd align
the two on byte ends). Terms: next-token divergences (forward/reverse KL, JSD, skew KL), the LM loss, hidden
states. Teacher signal: the teacher's top-k next-token log-probs, stored once as Parquet shards and reused
(`kdistill teacher-signal`). Score: perplexity and bits per byte of the test text, generation speed, sample
generations.
"""

from __future__ import annotations

import copy
import json
import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from kdistill.cache import (
    FORMAT_VERSION,
    SignalError,
    TopKCache,
    build_topk_cache,
    check_signal_dir,
    default_cache_root,
    open_teacher_signal,
    topk_key,
    vocab_size,
)
from kdistill.config import RunConfig
from kdistill.data import SPLITS, LMBlocks, LMCorpus, encode_blocks, load_lm_corpus, pack_blocks, pad_id_of, text_blocks
from kdistill.strategies.causal import lm_only_spec, with_alignment, with_targets
from kdistill.strategies.phase import Phase
from kdistill.errors import UserError
from kdistill.measure import (
    SAMPLE_NEW_TOKENS,
    SPEED_NEW_TOKENS,
    block_parameters,
    compare_lm_speed,
    evaluate_lm_model,
    machine_info,
    sample_generations,
)
from kdistill.io import atomic_write_json, atomic_write_text, check_writable, output_errors
from kdistill.models import dir_size_mb, load_causal_lm, load_tokenizer, read_meta
from kdistill.pipeline.common import run_dir_of, train_lm_phase, writing
from kdistill.pipeline.preflight import preflight
from kdistill.pipeline.students import make_student, term_spec
from kdistill.reporting import (
    draw_or_skip,
    format_cell,
    plot_lm_curves,
    plot_lm_sizes,
    student_line,
    summary_table,
    write_report,
)
from kdistill.rundir import run_dir_for, run_fingerprint
from kdistill.student import describe_student
from kdistill.task import Task
from kdistill.teacher import load_causal_teacher, max_positions
from kdistill.terms import CROSS_TOKENIZER_TERMS, TermSpec, check_terms
from kdistill.tokenalign import shared_vocab, token_byte_lengths
from kdistill.training import is_main_process, world_size

log = logging.getLogger(__name__)


def check_causal_lm(cfg: RunConfig) -> None:
    """What a causal-LM run supports: token-level loss terms, the explicit strategy, one teacher."""
    try:
        check_terms(cfg.distill.losses, cfg.task)
    except ValueError as e:
        raise UserError(f"distill.losses: {e}") from None
    if cfg.distill.strategy != "explicit":
        raise UserError(f"distill.strategy: causal-lm supports explicit (a frozen teacher), not "
                        f"{cfg.distill.strategy}")
    if cfg.distill.on_policy_fraction + cfg.distill.seq_kd_fraction > 1:
        raise UserError("distill.on_policy_fraction + distill.seq_kd_fraction must be <= 1 (they are the "
                        "probabilities that a step trains on student / teacher generations)")
    if cfg.distill.extra_teachers:
        raise UserError("distill.extra_teachers: not supported for causal-lm")

def run_causal_lm(cfg: RunConfig, out: str | Path | None = None, *, resume: bool = False,
                  overwrite: bool = False) -> Path:
    """`kdistill run` for a causal LM: corpus -> packed blocks -> the given teacher (+ top-k cache) ->
    student -> KD and no-KD training -> perplexity, speed, sample generations -> metrics.json + report. Returns the
    run directory (created once data and teacher are loaded). resume, overwrite: as `run`."""
    started = time.perf_counter()
    run_dir = run_dir_of(cfg, out)
    preflight(cfg, run_dir, resume=resume, overwrite=overwrite)
    corpus = load_lm_corpus(cfg.data)
    teacher, tokenizer, teacher_name, teacher_file_mb = load_causal_teacher(cfg)
    data = lm_data(cfg, corpus, teacher, tokenizer)
    signal = None
    if cfg.distill.teacher_signal and any(w > 0 for t, w in cfg.distill.losses.items() if t != "lm"):
        train = data.teacher_blocks["train"]  # verified before the run dir is claimed: a bad one leaves nothing
        signal = open_prebuilt_signal(cfg.distill.teacher_signal,
                                      topk_key(teacher, train.input_ids, train.attention_mask,
                                               k=cfg.distill.cache_top_k, ends=train.ends if data.cross else None),
                                      vocab_size(teacher))
    fingerprint = run_fingerprint(cfg, {s: corpus.docs[s] for s in ("train", "validation")})
    with run_dir_for(cfg, run_dir, fingerprint, resume=resume, overwrite=overwrite), writing(run_dir):
        return run_lm_phases(cfg, run_dir, corpus, data, teacher, tokenizer, teacher_name, teacher_file_mb, started,
                             resume=resume, fingerprint=fingerprint, signal=signal)

@dataclass
class LMData:
    """A causal-LM run's blocks as each model reads them: the student's, and the teacher's (the same object when
    they share a tokenizer; else the same text pieces in the teacher's tokens, with byte ends)."""

    blocks: dict[str, LMBlocks]
    teacher_blocks: dict[str, LMBlocks]
    student_tokenizer: object

    @property
    def cross(self) -> bool:
        return self.teacher_blocks is not self.blocks

def lm_data(cfg: RunConfig, corpus: LMCorpus, teacher, tokenizer) -> LMData:
    """The corpus cut into blocks for each model: documents packed in the one tokenizer, or, across tokenizers,
    the same text pieces in the student's and the teacher's tokens."""
    student_tokenizer, cross = lm_student_tokenizer(cfg, tokenizer)
    limit = max_positions(teacher.config)
    if limit is not None and cfg.data.block_size > limit:
        raise UserError(f"data.block_size: {cfg.data.block_size} exceeds the teacher's {limit} positions")
    if cross:
        pieces = {s: text_blocks(corpus.docs[s], student_tokenizer, cfg.data.block_size) for s in SPLITS}
        blocks = {s: encode_blocks(pieces[s], student_tokenizer, cfg.data.block_size) for s in SPLITS}
        teacher_blocks = {s: encode_blocks(pieces[s], tokenizer, limit) for s in SPLITS}
    else:
        blocks = {s: pack_blocks(corpus.docs[s], student_tokenizer, cfg.data.block_size) for s in SPLITS}
        teacher_blocks = blocks
    log.info("data: %s documents -> %s blocks of %d tokens%s", corpus.summary()["documents"],
             {s: len(b) for s, b in blocks.items()}, cfg.data.block_size,
             f" (the teacher's tokens: up to {teacher_blocks['train'].input_ids.shape[1]})" if cross else "")
    return LMData(blocks, teacher_blocks, student_tokenizer)

def lm_student_tokenizer(cfg: RunConfig, teacher_tokenizer):
    """(the student's tokenizer, whether the run distils across tokenizers): a student.model reads its own; a
    student built from the teacher reads the teacher's. Across tokenizers only with a cross-tokenizer term."""
    cross_terms = sorted(t for t, w in cfg.distill.losses.items() if w > 0 and t in CROSS_TOKENIZER_TERMS)
    if not cfg.student.model:
        return teacher_tokenizer, False  # (config: a cross-tokenizer term needs a student.model)
    student_tokenizer = load_tokenizer(cfg.student.model)
    if student_tokenizer.pad_token_id is None:
        student_tokenizer.pad_token = student_tokenizer.eos_token
    differ = student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab()
    if differ and not cross_terms:
        raise UserError(f"student.model: {cfg.student.model} has another tokenizer than the teacher "
                        f"({len(student_tokenizer)} vs {len(teacher_tokenizer)} tokens), so the terms "
                        f"{', '.join(sorted(t for t, w in cfg.distill.losses.items() if w > 0))} cannot compare "
                        "them token by token; distil across tokenizers with distill.losses uld or aligned_kd")
    if cross_terms and not (student_tokenizer.is_fast and getattr(teacher_tokenizer, "is_fast", False)):
        raise UserError(f"distill.losses.{cross_terms[0]}: aligning two tokenizations needs fast tokenizers "
                        "(character offsets) on both sides")
    return student_tokenizer, bool(cross_terms)

def build_teacher_signal(cfg: RunConfig, teacher, data: LMData, path: str | Path | None = None) -> TopKCache:
    """The teacher signal of the run's training blocks: opened where complete, else computed (missing shards
    only). path: its dir (default: the automatic cache's dir of its key). Every process calls it."""
    train = data.teacher_blocks["train"]
    return build_topk_cache(teacher, train.input_ids, train.attention_mask, k=cfg.distill.cache_top_k,
                            root=default_cache_root(), path=path, batch_size=max(1, cfg.train.batch_size),
                            autocast_dtype=torch.bfloat16 if cfg.train.mixed_precision == "bf16" else None,
                            ends=train.ends if data.cross else None)  # across tokenizers the student aligns to them

def signal_run(cfg: RunConfig, out: str | Path | None = None) -> Path:
    """`kdistill teacher-signal`: run the recipe's teacher once over its training blocks and write the teacher
    signal (Parquet shards + manifest.json) to `out`, or to the automatic cache, where `kdistill run` finds it; a
    signal in `out` takes `--set distill.teacher_signal=<out>`. Resumes a killed build; under torchrun /
    accelerate launch each process computes its share of the shards. Returns the signal's dir."""
    check_causal_lm(cfg)
    if out is not None:
        check_signal_dir(out)
    where = Path(out) if out is not None else default_cache_root()
    check_writable(where, inside=True)  # before the teacher is loaded; its space once the blocks are known
    corpus = load_lm_corpus(cfg.data)
    teacher, tokenizer, _, _ = load_causal_teacher(cfg)
    data = lm_data(cfg, corpus, teacher, tokenizer)
    t0 = time.perf_counter()
    with output_errors(where, "free space, fix the permissions or choose another --out"):
        signal = build_teacher_signal(cfg, teacher, data, out)  # refuses an --out holding another key's signal
    log.info("teacher signal %s: %d blocks, k=%d, %s in %.0f s", signal.path, len(signal), signal.k,
             "already complete" if signal.reused else "written", time.perf_counter() - t0)
    return Path(signal.path)


def open_prebuilt_signal(where: str, key: dict, vocab: int | None = None) -> TopKCache:
    """distill.teacher_signal: the signal at `where` (path or fsspec URL), which must hold exactly this run's key,
    verified from its manifest and shard footers (`TopKCache.verify`; vocab: the teacher's vocabulary size)."""
    signal = open_teacher_signal(where, key)
    if signal is not None:
        t0 = time.perf_counter()
        try:
            signal.verify(vocab)
        except SignalError as e:
            raise SignalError(f"distill.teacher_signal: {str(e).removeprefix('teacher signal ')}") from None
        log.info("teacher signal %s: %d shard footers verified in %.2f s", where, len(signal.shards),
                 time.perf_counter() - t0)
        return signal
    found = open_teacher_signal(where)  # whatever it holds, to say what differs
    if found is None:
        raise UserError(f"distill.teacher_signal: {where} is not a complete teacher signal of format {FORMAT_VERSION} "
                        "(no readable manifest.json listing every shard; see the warning above, if any)")
    differ = "; ".join(f"{field} {found.key.get(field)!r}, this run {value!r}" for field, value in key.items()
                       if found.key.get(field) != value)
    raise UserError(f"distill.teacher_signal: {where} was built for another teacher, data or k ({differ}); "
                    "unset it to build this run's own")


def run_lm_phases(cfg: RunConfig, run_dir: Path, corpus: LMCorpus, data: LMData, teacher, tokenizer,
                  teacher_name: str, teacher_file_mb: float | None, started: float, *, resume: bool,
                  fingerprint: dict, signal: TopKCache | None = None) -> Path:
    """Student, KD and no-KD training, evaluation and report of a causal-LM run, in its run dir. A resumed run
    skips the phases whose model is saved and continues the one it was in from its checkpoint. Several processes
    train together; the main process alone writes and evaluates. `signal`: distill.teacher_signal, opened and
    verified (open_prebuilt_signal) before the run dir was claimed."""
    main = is_main_process()
    blocks, student_tokenizer = data.blocks, data.student_tokenizer
    calibration = blocks["train"].batch(slice(0, 8))
    student, init_layers = make_student(cfg, teacher, calibration)
    shapes = describe_student(teacher, student)
    shapes["teacher_block_params"] = block_parameters(teacher)
    shapes["student_block_params"] = block_parameters(student)
    shapes["block_param_ratio"] = shapes["student_block_params"] / shapes["teacher_block_params"]
    baseline = copy.deepcopy(student) if cfg.distill.baseline else None  # same init: the loss is the only change
    spec = term_spec(cfg, teacher, student, init_layers)
    if "aligned_kd" in spec.active:
        spec.shared_vocab = shared_vocab(tokenizer, student_tokenizer)
        log.info("aligned_kd: %d tokens shared by the two vocabularies (teacher %d, student %d)",
                 len(spec.shared_vocab[0]), len(tokenizer), len(student_tokenizer))

    cache, cache_info = None, None
    prebuilt = cfg.distill.teacher_signal
    use_cache = cfg.distill.cache_teacher == "on" or bool(prebuilt) or (cfg.distill.cache_teacher == "auto"
                                                                         and not spec.needs_teacher_features)
    kd_terms = set(spec.active) - {"lm"}
    if use_cache and spec.needs_teacher_features:
        raise UserError(f"{'distill.teacher_signal' if prebuilt else 'distill.cache_teacher: on'} stores top-k "
                        "logits only, but the loss terms "
                        f"{sorted(set(spec.active) & {'hidden_mse', 'hidden_cosine', 'embedding_mse'})} need the "
                        "teacher's hidden states; " + ("drop them or the signal" if prebuilt else "use auto or off"))
    if use_cache and kd_terms:
        t0 = time.perf_counter()
        if prebuilt:
            cache = signal
        else:  # every process computes its share of the shards, then all read the whole signal
            cache = build_teacher_signal(cfg, teacher, data)
        cache_info = {"k": cache.k, "path": str(cache.path), "seconds": time.perf_counter() - t0,
                      "status": "prebuilt" if prebuilt else "reused" if cache.reused else "built", "key": cache.key}

    meta = {"task": cfg.task, "max_length": cfg.data.block_size, "strategy": cfg.distill.strategy,
            "losses": cfg.distill.losses, "teacher": teacher_name, "student_init": shapes["init"]}
    phases = {"student": (student, spec, teacher, cache, {"role": "student", **meta})}
    if baseline is not None:
        phases["baseline"] = (baseline, lm_only_spec(), None, None,
                              {**meta, "role": "no-KD baseline", "losses": {"lm": 1.0}})
    models, histories = {"teacher": teacher}, {"teacher": None}
    for name, (model, phase_spec, phase_teacher, phase_cache, phase_meta) in phases.items():
        phase = Phase(model, [phase_teacher] if phase_teacher is not None else [], student_tokenizer, blocks,
                      phase_spec, cfg.distill, cfg.train, cfg.task, name=name)
        models[name], histories[name] = train_lm_phase(cfg, run_dir, phase, resume=resume, fingerprint=fingerprint,
                                                       meta=phase_meta, main=main, cache=phase_cache,
                                                       pad_id=pad_id_of(student_tokenizer),
                                                       eos_id=student_tokenizer.eos_token_id)
    if not main:  # evaluation and report: the main process alone
        return run_dir
    return evaluate_lm_run(cfg, run_dir, corpus, data, models, histories, spec, shapes, cache, cache_info,
                           tokenizer, teacher_name, teacher_file_mb, started)


def evaluate_lm_run(cfg: RunConfig, run_dir: Path, corpus: LMCorpus, data: LMData, models: dict, histories: dict,
                    spec: TermSpec, shapes: dict, cache: TopKCache | None, cache_info: dict | None, tokenizer,
                    teacher_name: str, teacher_file_mb: float | None, started: float) -> Path:
    """Every model of a causal-LM run on the test blocks (perplexity, bits per byte, speed side by side, sample
    generations), then metrics.json and the report (main process)."""
    blocks, student_tokenizer = data.blocks, data.student_tokenizer
    teacher = models["teacher"]
    results = {}
    # each model reads the test pieces in its own tokens; bits per byte compares them across tokenizers
    teacher_bytes = token_byte_lengths(tokenizer)
    student_bytes = teacher_bytes if student_tokenizer is tokenizer else token_byte_lengths(student_tokenizer)
    reads = {name: (data.teacher_blocks["test"], teacher_bytes, tokenizer) if name == "teacher" else
             (blocks["test"], student_bytes, student_tokenizer) for name in models}  # blocks, byte lengths, tokenizer
    for name, model in models.items():
        results[name] = evaluate_lm_model(model, reads[name][0], cfg.eval, reads[name][1])
        results[name]["size_mb"] = dir_size_mb(run_dir / name) if name != "teacher" else \
            results[name]["params"] * 4 / 2**20
        results[name]["train_wall_time_s"] = histories[name].wall_time_s if histories[name] else \
            read_meta(run_dir / name).get("train_wall_time_s")
        if name == "teacher":
            results[name]["source_file_mb"] = teacher_file_mb
        if histories[name] and histories[name].evals:
            results[name]["validation_perplexity"] = histories[name].evals[-1]["perplexity"]
    pads = {name: pad_id_of(tok) for name, (_, _, tok) in reads.items()}
    for name, numbers in compare_lm_speed(models, {n: r[0] for n, r in reads.items()}, cfg.eval, pads).items():
        results[name].update(numbers)
    t = results["teacher"]
    for r in results.values():
        r["speedup_vs_teacher"] = r["generate_tokens_per_s"] / t["generate_tokens_per_s"]
        r["size_ratio_vs_teacher"] = t["params"] / r["params"]
        r["perplexity_ratio_vs_teacher"] = r["perplexity"] / t["perplexity"]
        r["bits_per_byte_ratio_vs_teacher"] = r["bits_per_byte"] / t["bits_per_byte"]

    metrics = {
        "run": cfg.name,
        "task": cfg.task,
        "strategy": cfg.distill.strategy,
        "teacher": teacher_name,
        "data": {**corpus.summary(), "block_size": cfg.data.block_size,
                 "blocks": {s: len(b) for s, b in blocks.items()}, "tokens": {s: b.tokens for s, b in blocks.items()}},
        "student_shape": shapes,
        "models": results,
        "samples": {**sample_generations({"teacher": teacher}, tokenizer, threads=cfg.eval.num_threads),
                    **sample_generations({n: m for n, m in models.items() if n != "teacher"}, student_tokenizer,
                                         threads=cfg.eval.num_threads)},
        "cross_tokenizer": cross_tokenizer_info(data, spec, cache) if data.cross else None,
        "teacher_cache": cache_info,
        "machine": {**machine_info(), "host": socket.gethostname(),
                    "eval_threads": cfg.eval.num_threads or torch.get_num_threads(),
                    "world_size": world_size()},
        "units": {"perplexity": "exp(nats/token)", "nll_per_token": "nats",
                  "bits_per_byte": "bits per UTF-8 byte of the predicted test tokens",
                  "generate_tokens_per_s": "tokens/s",
                  "score_tokens_per_s": "tokens/s", "ms_per_token_batch1": "ms", "size_mb": "MiB",
                  "train_wall_time_s": "s"},
        "total_wall_time_s": time.perf_counter() - started,
    }
    atomic_write_json(run_dir / "metrics.json", metrics)
    write_report([run_dir])
    log.info("%s run done in %.0f s: %s", cfg.task, metrics["total_wall_time_s"],
             json.dumps({n: round(r["perplexity"], 2) for n, r in results.items()}))
    return run_dir

def cross_tokenizer_info(data: LMData, spec: TermSpec, signal: TopKCache) -> dict:
    """What a cross-tokenizer run aligned: the share of the student's training targets with a teacher position
    ending at the same byte, and the size of the shared vocabulary (aligned_kd)."""
    train = data.blocks["train"]
    batch = with_alignment(with_targets({**train.batch(slice(None)), "ends": train.ends,
                                         "teacher_ends": signal.ends(range(len(signal)))}))
    aligned, targets = batch["aligned"].shape[1], int(batch["valid"].sum())
    return {"terms": sorted(set(spec.active) & CROSS_TOKENIZER_TERMS), "aligned_targets": aligned,
            "targets": targets, "aligned_fraction": aligned / max(1, targets),
            "shared_vocab": len(spec.shared_vocab[0]) if spec.shared_vocab is not None else None,
            "teacher_block_tokens": data.teacher_blocks["train"].input_ids.shape[1]}


def check_config(cfg) -> None:
    if cfg.data.unlabeled_file or cfg.data.augment:
        raise ValueError(f"data.unlabeled_file and data.augment work with the encoder tasks, not {cfg.task}")


def check_recipe(cfg, *, distilling: bool) -> None:
    if distilling:
        check_causal_lm(cfg)


def check_student_tokenizer(cfg, *, distilling: bool) -> None:
    if distilling and cfg.student.model and cfg.teacher.model:
        lm_student_tokenizer(cfg, load_tokenizer(cfg.teacher.model))  # a mismatch without a method stops here


def claims(config: dict, _path) -> bool:
    return any("CausalLM" in a or "LMHead" in a for a in config.get("architectures") or [])


def student_model(cfg, _teacher):
    return load_causal_lm(cfg.student.model)  # a built-in alias, a GGUF file or a model dir


# ---------------------------------------------------------------------------------------------------- report

LM_COLUMNS = [  # causal-lm runs (metrics.json "task": "causal-lm")
    ("perplexity", "test perplexity", "{:.2f}"),
    ("bits_per_byte", "bits/byte", "{:.3f}"),
    ("params", "params", "{:,}"),
    ("block_params", "block params", "{:,}"),
    ("size_mb", "MB", "{:.1f}"),
    ("generate_tokens_per_s", "generate b=1 (tok/s)", "{:.1f}"),
    ("score_tokens_per_s", "score (tok/s)", "{:.0f}"),
    ("speedup_vs_teacher", "speed-up", "{:.2f}x"),
    ("size_ratio_vs_teacher", "size ratio", "{:.2f}x"),
    ("train_wall_time_s", "train time (s)", "{:.0f}"),
]


def write_lm_report(runs: list[dict], out: Path) -> Path:
    """report.md for causal-LM runs: the perplexity table, loss curves, perplexity vs speed, sample generations."""
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    first = runs[0]["metrics"]
    lines = [f"# kdistill report: {', '.join(r['metrics']['run'] for r in runs)}", "", summary_table(runs), ""]
    data, machine = first["data"], first.get("machine", {})
    some_model = next(iter(first["models"].values()))
    predicted = some_model.get("n_test_tokens", data["tokens"]["test"])
    in_bytes = f" ({some_model['n_test_bytes']:,} bytes: bits/byte = their NLL / (ln 2 x bytes))" \
        if "n_test_bytes" in some_model else ""
    lines += [f"Held-out perplexity on {predicted:,} predicted test tokens{in_bytes} ({data['documents']['test']} "
              f"documents of {data['source']}, split by document, blocks of {data['block_size']} tokens). "
              f"Generation: greedy, batch 1, {SPEED_NEW_TOKENS} new tokens; scoring: one forward over a batch of "
              f"blocks. CPU, {machine.get('eval_threads', '?')} threads, medians after warm-up, all models "
              f"interleaved in one process. `baseline` is the same student (same init, same steps) trained on the "
              f"LM loss only.", ""]
    shape = first.get("student_shape")
    if shape:
        lines += [student_line(shape), ""]
    cache = first.get("teacher_cache")
    if cache:
        lines += [f"Teacher cache: top-{cache['k']} log-probs per token, {cache['status']} "
                  f"({cache['seconds']:.0f} s), `{cache['path']}`; the KD losses renormalise over the stored "
                  f"support.", ""]

    if draw_or_skip(plot_lm_curves, runs, plots / "lm_curves_tradeoff.png"):
        lines += ["## Training loss and perplexity against speed", "", "![lm](plots/lm_curves_tradeoff.png)", ""]
    sizes = lm_size_points(runs)
    if len(runs) > 1 and sizes:
        lines += ["## Trade-off: student size against perplexity and speed", "", lm_size_table(sizes), "",
                  "One row per student size (its transformer-block parameters; the embeddings are shared by every "
                  "size): mean over the runs of that size, the range in brackets. KD / teacher: the KD student's "
                  "mean perplexity over the teacher's. Speed-up: batch-1 generation against the teacher measured "
                  "in the same run.", ""]
        if draw_or_skip(plot_lm_sizes, sizes, plots / "lm_size_tradeoff.png"):
            lines += ["![sizes](plots/lm_size_tradeoff.png)", ""]

    for run in runs:
        samples = run["metrics"].get("samples") or {}
        if not samples:
            continue
        lines += [f"## Sample generations ({run['metrics']['run']}; greedy, {SAMPLE_NEW_TOKENS} new tokens)", ""]
        names = list(samples)
        for i, prompt in enumerate(samples[names[0]]):
            lines += [f"**{prompt['prompt']}** …", ""]
            for name in names:
                text = " ".join(samples[name][i]["completion"].split())
                lines.append(f"- *{name}*: {text}")
            lines.append("")
    return atomic_write_text(out / "report.md", "\n".join(lines))


def lm_size_points(runs: list[dict]) -> list[dict]:
    """The runs' students grouped by size (transformer-block parameters), smallest first: per size the lists, one
    entry per run, of the KD student's and the no-KD baseline's perplexity, bits/byte and generation speed, and
    the teacher's. Runs without both a student and a baseline are left out: a point needs its control."""
    by_size: dict[int, dict] = {}
    for run in runs:
        models = run["metrics"]["models"]
        if not {"teacher", "student", "baseline"} <= set(models):
            continue
        point = by_size.setdefault(models["student"]["block_params"], {
            "block_params": models["student"]["block_params"], "runs": [],
            **{f"{name}_{key}": [] for name in ("teacher", "student", "baseline")
               for key in ("perplexity", "bits_per_byte", "generate_tokens_per_s")}})
        point["runs"].append(run["metrics"]["run"])
        for key in ("perplexity", "bits_per_byte", "generate_tokens_per_s"):
            for name in ("teacher", "student", "baseline"):
                point[f"{name}_{key}"].append(models[name].get(key))
    points = sorted(by_size.values(), key=lambda p: p["block_params"])
    for p in points:
        p["teacher_block_params"] = runs[0]["metrics"]["models"]["teacher"]["block_params"]
    return points


def _mean_range(values: list[float], pattern: str) -> str:
    if len(values) == 1:
        return pattern.format(values[0])
    return f"{pattern.format(np.mean(values))} ({pattern.format(min(values))}–{pattern.format(max(values))})"


def lm_size_table(points: list[dict]) -> str:
    """Markdown: per student size, KD vs no-KD perplexity and bits/byte, the ratio to the teacher, the speed-up."""
    lines = ["| block params | runs | KD perplexity | no-KD perplexity | KD / teacher | KD below no-KD | "
             "bits/byte KD | bits/byte no-KD | generation speed-up |", "|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        below = sum(s < b for s, b in zip(p["student_perplexity"], p["baseline_perplexity"]))
        speedup = [s / t for s, t in zip(p["student_generate_tokens_per_s"], p["teacher_generate_tokens_per_s"])
                   if s and t]
        lines.append(
            f"| {p['block_params'] / 1e6:.1f}M ({p['block_params'] / p['teacher_block_params']:.0%}) | "
            f"{len(p['runs'])} | {_mean_range(p['student_perplexity'], '{:.2f}')} | "
            f"{_mean_range(p['baseline_perplexity'], '{:.2f}')} | "
            f"{np.mean(p['student_perplexity']) / np.mean(p['teacher_perplexity']):.2f}x | "
            f"{below}/{len(p['runs'])} | {_mean_range(p['student_bits_per_byte'], '{:.3f}')} | "
            f"{_mean_range(p['baseline_bits_per_byte'], '{:.3f}')} | "
            f"{format_cell(np.mean(speedup) if speedup else None, '{:.2f}x')} |")
    return "\n".join(lines)


TASK = Task(
    name="causal-lm",
    summary="A GPT-like decoder continues text; scored by perplexity and bits per byte, with generation speed.",
    term_units={"next_token": None, "cross_tokenizer": None, "hidden": "targets"},
    headline=("perplexity", "bits_per_byte"),
    run=run_causal_lm,
    auto_model=AutoModelForCausalLM,
    features=frozenset({"fsdp", "prune_student_model"}),
    length_key="data.block_size",
    check_config=check_config,
    preflight=check_recipe,
    preflight_files=check_student_tokenizer,
    claims=claims,
    student_model=student_model,
    teacher_signal=signal_run,
    report_columns=LM_COLUMNS,
    report=write_lm_report,
)
