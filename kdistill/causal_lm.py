"""Causal-LM distillation, end to end: corpus -> packed blocks -> teacher (+ top-k cache) -> student -> KD and
no-KD training -> perplexity, speed, sample generations -> metrics.json + report.

`run_causal_lm(cfg, out)` is what `kdistill run` calls for `task: causal-lm`.

Data. Documents come from a built-in dataset (its texts; labels are ignored) or from `data.train_file`
(+ optional `validation_file` / `test_file`), column `data.text_column`, any format `data.read_table` reads.
They are split BY DOCUMENT with a seeded shuffle (`data.test_fraction`, then `data.validation_fraction` of the
rest), so no held-out text was seen in training; held-out documents whose text also occurs in train are dropped
(`data.drop_test_duplicates`). `data.limit` caps documents per split. Each split is then tokenised (no special
tokens), documents joined with the tokenizer's EOS, and cut into blocks of `data.block_size` tokens; the last,
shorter block is padded (attention mask 0), so the losses' padding masks apply.

Positions. In a block, position t predicts token t+1: `next_token_targets` gives labels (B, L) and the mask
`valid` (B, L) of positions whose own token and next token are both real. Every loss term and the perplexity
count exactly these positions; the last position of a block predicts nothing.

Evaluation. Held-out perplexity = exp(mean next-token NLL) over the test blocks. Speed, all models interleaved
in one process: generation tokens/s at batch 1 (greedy, a fixed number of new tokens after a 32-token prompt
taken from the test blocks) and scoring tokens/s (one forward over `eval.throughput_batch_size` blocks); medians
after `eval.warmup` untimed runs. Params: all, and those in the transformer blocks alone (the embeddings are
shared with the LM head and identical in size for any depth). A few greedy generations from fixed prompts show
what the perplexities mean.

The teacher is not fine-tuned here: it is the given causal LM as loaded (`teacher.epochs` does not apply).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import socket
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from kdistill.config import DataConfig, EvalConfig, RunConfig
from kdistill.errors import DataError, UserError
from kdistill.io import atomic_write_json, atomic_write_text
from kdistill.training import world_size

log = logging.getLogger(__name__)

SAMPLE_PROMPTS = (
    "The government has announced",
    "Shares in the technology company",
    "The England coach said",
)
"""Fixed prompts of the report's sample generations (news-like, to match the built-in corpus)."""
SAMPLE_NEW_TOKENS = 30
SPEED_PROMPT_TOKENS = 32
SPEED_NEW_TOKENS = 32
SPLITS = ("train", "validation", "test")


# ------------------------------------------------------------------------------------------------------ data


@dataclass
class LMCorpus:
    """Documents per split (train / validation / test), split by document."""

    docs: dict[str, list[str]]
    source: str
    leakage: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {"source": self.source, "documents": {s: len(self.docs[s]) for s in SPLITS}, "leakage": self.leakage}


@dataclass
class LMBlocks:
    """Packed token blocks of one split: input_ids and attention_mask, both (N, L) int64."""

    input_ids: Tensor
    attention_mask: Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())

    def batch(self, rows) -> dict[str, Tensor]:
        return {"input_ids": self.input_ids[rows], "attention_mask": self.attention_mask[rows]}


def _file_texts(path: str, column: str, key: str) -> list[str]:
    from kdistill.data import read_table

    rows, unit = read_table(path)
    if not rows:
        raise DataError(f"{path}: no rows")
    if column not in rows[0]:
        raise DataError(f"{path}: column '{column}' not found (columns: {', '.join(map(str, rows[0]))}); "
                        f"set data.text_column")
    texts = []
    first = 2 if unit == "data row" else 1
    for i, row in enumerate(rows, first):
        value = row.get(column)
        if value is None or (isinstance(value, str) and not value.strip()):
            continue  # an empty document adds nothing to a corpus
        if not isinstance(value, str):
            raise DataError(f"{path}: {'line' if unit == 'data row' else unit} {i}: column '{column}' is "
                            f"{type(value).__name__}, expected text ({key})")
        texts.append(value)
    if not texts:
        raise DataError(f"{path}: column '{column}' holds no text")
    return texts


def _normalised(text: str) -> str:
    return " ".join(text.split()).lower()


def load_lm_corpus(cfg: DataConfig) -> LMCorpus:
    """Documents of the configured data, split train / validation / test by document (seeded)."""
    from kdistill.data import BUILTIN_DATASETS

    if cfg.train_file:
        docs, source = _file_texts(cfg.train_file, cfg.text_column, "data.train_file"), cfg.train_file
    else:
        if cfg.dataset not in BUILTIN_DATASETS:
            raise DataError(f"data.dataset: unknown built-in dataset '{cfg.dataset}' "
                            f"(known: {', '.join(BUILTIN_DATASETS)}); or set data.train_file")
        docs = [r["text"] for r in BUILTIN_DATASETS[cfg.dataset][0]()["train"] if r["text"].strip()]
        source = cfg.dataset
    test = _file_texts(cfg.test_file, cfg.text_column, "data.test_file") if cfg.test_file else None
    val = _file_texts(cfg.validation_file, cfg.text_column, "data.validation_file") if cfg.validation_file else None

    order = list(range(len(docs)))
    random.Random(cfg.seed).shuffle(order)
    docs = [docs[i] for i in order]
    if test is None:
        n_test = max(1, round(len(docs) * cfg.test_fraction))
        test, docs = docs[:n_test], docs[n_test:]
    if val is None:
        n_val = max(1, round(len(docs) * cfg.validation_fraction))
        val, docs = docs[:n_val], docs[n_val:]
    train = docs

    seen = {_normalised(t) for t in train}
    leakage = {"removed": cfg.drop_test_duplicates}
    splits = {"train": train}
    for name, held in (("validation", val), ("test", test)):
        leaked = sum(_normalised(t) in seen for t in held)
        leakage[f"{name}_docs_also_in_train"] = leaked
        splits[name] = [t for t in held if _normalised(t) not in seen] if cfg.drop_test_duplicates else held
    if leakage["test_docs_also_in_train"] or leakage["validation_docs_also_in_train"]:
        log.warning("%s: %d test and %d validation documents also appear in train; %s", source,
                    leakage["test_docs_also_in_train"], leakage["validation_docs_also_in_train"],
                    "removed" if cfg.drop_test_duplicates else "kept (perplexity will be optimistic)")
    for name in SPLITS:
        if cfg.limit:
            splits[name] = splits[name][: cfg.limit]
        if not splits[name]:
            raise DataError(f"{source}: the {name} split has no documents; use more data or other split fractions")
    return LMCorpus(splits, str(source), leakage)


def pack_blocks(texts: list[str], tokenizer, block_size: int) -> LMBlocks:
    """Tokenise documents, join them with EOS, cut into blocks of `block_size`; the last block is padded."""
    ids: list[int] = []
    sep = tokenizer.eos_token_id
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    for doc in encoded:
        ids.extend(doc)
        if sep is not None:
            ids.append(sep)
    if not ids:
        raise DataError("no tokens to pack: the documents tokenise to nothing")
    n = math.ceil(len(ids) / block_size)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (sep or 0)
    flat = torch.full((n * block_size,), pad, dtype=torch.long)
    flat[: len(ids)] = torch.tensor(ids, dtype=torch.long)
    mask = torch.zeros(n * block_size, dtype=torch.long)
    mask[: len(ids)] = 1
    return LMBlocks(flat.view(n, block_size), mask.view(n, block_size))


def next_token_targets(input_ids: Tensor, attention_mask: Tensor, prompt_length: int = 0) -> tuple[Tensor, Tensor]:
    """labels (B, L): labels[:, t] = input_ids[:, t+1]; valid (B, L) bool: position t counts.

    A position counts when it and the next one are real tokens and the next one lies at or after
    `prompt_length` (for generated continuations only the generated tokens are targets).
    """
    mask = attention_mask.bool()
    labels = torch.zeros_like(input_ids)
    labels[:, :-1] = input_ids[:, 1:]
    valid = torch.zeros_like(mask)
    valid[:, :-1] = mask[:, :-1] & mask[:, 1:]
    if prompt_length > 1:
        valid[:, : prompt_length - 1] = False
    return labels, valid


# ------------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def perplexity(model, blocks: LMBlocks, batch_size: int = 8) -> dict:
    """Held-out next-token NLL (nats/token), its exp (perplexity) and the number of predicted tokens."""
    from kdistill import losses

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for start in range(0, len(blocks), batch_size):
            batch = blocks.batch(slice(start, start + batch_size))
            labels, valid = next_token_targets(batch["input_ids"], batch["attention_mask"])
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float()
            s, c = losses.lm_ce_tokens(logits, labels.to(device), mask=valid.to(device))
            total += float(s)
            count += int(c)
    finally:
        model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}


def _generate(model, input_ids: Tensor, new_tokens: int, pad_id: int) -> Tensor:
    return model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_id,
                          num_beams=1, top_k=None, top_p=None, temperature=None)


@contextmanager
def torch_threads(n: int | None):
    """Run the block with `n` torch CPU threads (None: unchanged), restoring the count afterwards."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield before
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def compare_lm_speed(models: dict, blocks: LMBlocks, cfg: EvalConfig, pad_id: int) -> dict[str, dict]:
    """Generation tokens/s (batch 1, greedy) and scoring tokens/s (a batch of blocks), models interleaved."""
    with torch_threads(cfg.num_threads) as threads_before:
        return _compare_lm_speed(models, blocks, cfg, pad_id, cfg.num_threads or threads_before)


@torch.no_grad()
def _compare_lm_speed(models: dict, blocks: LMBlocks, cfg: EvalConfig, pad_id: int, threads: int) -> dict:
    n = len(blocks)
    prompt_len = min(SPEED_PROMPT_TOKENS, blocks.input_ids.shape[1])
    times = {name: {"gen": [], "score": []} for name in models}
    bs = cfg.throughput_batch_size
    n_batches = max(1, cfg.repeats // 4)
    for m in models.values():
        m.eval()
    for i in range(cfg.warmup + cfg.repeats):
        prompt = blocks.input_ids[i % n, :prompt_len][None]
        for name, m in models.items():
            start = time.perf_counter()
            _generate(m, prompt.to(next(m.parameters()).device), SPEED_NEW_TOKENS, pad_id)
            if i >= cfg.warmup:
                times[name]["gen"].append(time.perf_counter() - start)
    scored = []
    for j in range(n_batches + 1):
        rows = [(j * bs + r) % n for r in range(bs)]
        batch = blocks.batch(rows)
        scored.append(int(batch["attention_mask"].sum()))
        for name, m in models.items():
            device = next(m.parameters()).device
            start = time.perf_counter()
            m(**{k: v.to(device) for k, v in batch.items()})
            if j >= 1:  # the first batch warms up
                times[name]["score"].append(time.perf_counter() - start)
    tokens_per_batch = statistics.median(scored[1:])
    out = {}
    for name, t in times.items():
        gen = statistics.median(t["gen"])
        out[name] = {
            "generate_tokens_per_s": SPEED_NEW_TOKENS / gen,
            "ms_per_token_batch1": 1000 * gen / SPEED_NEW_TOKENS,
            "score_tokens_per_s": tokens_per_batch / statistics.median(t["score"]),
            "score_batch_size": bs,
            "threads": threads,
        }
    return out


@torch.no_grad()
def sample_generations(models: dict, tokenizer, prompts=SAMPLE_PROMPTS, new_tokens: int = SAMPLE_NEW_TOKENS,
                       threads: int | None = None) -> dict:
    """Greedy continuations of the fixed prompts by every model: {name: [{"prompt", "completion"}]}."""
    with torch_threads(threads):
        return _sample_generations(models, tokenizer, prompts, new_tokens)


@torch.no_grad()
def _sample_generations(models: dict, tokenizer, prompts, new_tokens: int) -> dict:
    out = {}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for name, model in models.items():
        model.eval()
        device = next(model.parameters()).device
        rows = []
        for prompt in prompts:
            ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
            generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                       max_new_tokens=new_tokens, pad_token_id=pad, num_beams=1,
                                       top_k=None, top_p=None, temperature=None)
            rows.append({"prompt": prompt,
                         "completion": tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)})
        out[name] = rows
    return out


def block_parameters(model) -> int:
    """Parameters inside the transformer blocks (the layer list), excluding embeddings, final norm and head."""
    from kdistill.student import find_layer_list

    return sum(p.numel() for p in find_layer_list(model)[1].parameters())


# --------------------------------------------------------------------------------------------------- models


def _plain_config(model) -> None:
    """Drop a GGUF loader's quantization_config: the weights are already dequantised fp32, and students copied
    from this config must save and load as plain Hugging Face models."""
    qc = getattr(model.config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if qc is not None and str(getattr(method, "value", method)) == "gguf":
        del model.config.quantization_config


def load_teacher(cfg: RunConfig):
    """(teacher in eval mode, tokenizer, description, on-disk MB of its source or None)."""
    from kdistill.models import dir_size_mb, load_causal_lm, load_model_dir, load_tokenizer, resolve_model_source

    if cfg.teacher.from_scratch is not None:
        raise UserError("teacher.from_scratch: causal-lm distils a given pretrained LM; set teacher.model")
    if cfg.teacher.path:
        teacher, tokenizer, _ = load_model_dir(cfg.teacher.path, task="causal-lm")
        name, file_mb = cfg.teacher.path, dir_size_mb(cfg.teacher.path)
    else:
        if not cfg.teacher.model:
            raise UserError("teacher.model: causal-lm needs a teacher (built-in smollm2-135m, a local HF dir, "
                            "a GGUF file or a hub id)")
        name = cfg.teacher.model
        source, extra = resolve_model_source(name)
        tokenizer = load_tokenizer(name)
        teacher = load_causal_lm(name)
        if "gguf_file" in extra:
            file_mb = (Path(source) / extra["gguf_file"]).stat().st_size / 2**20
        else:
            file_mb = dir_size_mb(source) if Path(source).is_dir() else None
    if not getattr(teacher, "can_generate", lambda: True)() or teacher.get_output_embeddings() is None:
        raise UserError(f"teacher: {name} is not a causal language model")
    _plain_config(teacher)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    teacher.eval().requires_grad_(False)
    return teacher, tokenizer, name, file_mb


def _max_positions(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


# ---------------------------------------------------------------------------------------------------- report


def write_lm_report(runs: list[dict], out: Path) -> Path:
    """report.md for causal-LM runs: the perplexity table, loss curves, perplexity vs speed, sample generations."""
    from kdistill.report import draw_or_skip, summary_table

    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    first = runs[0]["metrics"]
    lines = [f"# kdistill report: {', '.join(r['metrics']['run'] for r in runs)}", "", summary_table(runs), ""]
    data, machine = first["data"], first.get("machine", {})
    predicted = next(iter(first["models"].values())).get("n_test_tokens", data["tokens"]["test"])
    lines += [f"Held-out perplexity on {predicted:,} predicted test tokens ({data['documents']['test']} "
              f"documents of {data['source']}, split by document, blocks of {data['block_size']} tokens). "
              f"Generation: greedy, batch 1, {SPEED_NEW_TOKENS} new tokens; scoring: one forward over a batch of "
              f"blocks. CPU, {machine.get('eval_threads', '?')} threads, medians after warm-up, all models "
              f"interleaved in one process. `baseline` is the same student (same init, same steps) trained on the "
              f"LM loss only.", ""]
    shape = first.get("student_shape")
    if shape:
        s, t = shape["student"], shape["teacher"]
        lines += [f"Student: {s['layers']} layers x {s['hidden']} hidden (teacher: {t['layers']} x {t['hidden']}); "
                  f"block parameters {shape['student_block_params']:,} vs {shape['teacher_block_params']:,} "
                  f"({shape['block_param_ratio']:.1%}); init {shape.get('init')}.", ""]
    cache = first.get("teacher_cache")
    if cache:
        lines += [f"Teacher cache: top-{cache['k']} log-probs per token, {cache['status']} "
                  f"({cache['seconds']:.0f} s), `{cache['path']}`; the KD losses renormalise over the stored "
                  f"support.", ""]

    if draw_or_skip(plot_lm_curves, runs, plots / "lm_curves_tradeoff.png"):
        lines += ["## Training loss and perplexity against speed", "", "![lm](plots/lm_curves_tradeoff.png)", ""]

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


def plot_lm_curves(runs: list[dict], path: Path) -> Path:
    """Training NLL per step, and test perplexity against batch-1 generation speed, for every model of the runs."""
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    many = len(runs) > 1
    for run in runs:
        for name, h in sorted(run["histories"].items()):
            if h["steps"]:  # the data's NLL where the run has that term: comparable between KD and no-KD
                key = "lm" if "lm" in h["steps"][0] else "loss"
                ax1.plot([s["step"] for s in h["steps"]], [s[key] for s in h["steps"]], lw=1,
                         label=(f"{run['metrics']['run']}/{name}" if many else name) + f" ({key})")
        for name, m in run["metrics"]["models"].items():
            if m.get("generate_tokens_per_s") and m.get("perplexity"):
                ax2.scatter(m["generate_tokens_per_s"], m["perplexity"], s=40)
                ax2.annotate(f"{run['metrics']['run']}/{name}" if many else name,
                             (m["generate_tokens_per_s"], m["perplexity"]), fontsize=8, xytext=(4, 4),
                             textcoords="offset points")
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("training NLL on the data (nats/token)")
    ax1.set_yscale("log")
    ax1.legend(fontsize=7)
    ax2.set_xlabel("generation tokens/s, batch 1")
    ax2.set_ylabel("test perplexity")
    ax2.set_yscale("log")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.suptitle("training curves and test perplexity against generation speed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -------------------------------------------------------------------------------------------------- pipeline


def _check_config(cfg: RunConfig) -> None:
    from kdistill.distill.causal import check_terms

    try:
        check_terms(cfg.distill.losses)
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


def run_causal_lm(cfg: RunConfig, out: str | Path | None = None, *, overwrite: bool = False) -> Path:
    """`kdistill run` for `task: causal-lm`; returns the run directory (created once data and teacher loaded)."""
    from kdistill.pipeline import preflight, run_dir_of
    from kdistill.rundir import run_dir_for, run_fingerprint

    started = time.perf_counter()
    _check_config(cfg)
    run_dir = run_dir_of(cfg, out)
    preflight(cfg, run_dir, overwrite=overwrite)
    corpus = load_lm_corpus(cfg.data)
    teacher, tokenizer, teacher_name, teacher_file_mb = load_teacher(cfg)
    limit = _max_positions(teacher.config)
    if limit is not None and cfg.data.block_size > limit:
        raise UserError(f"data.block_size: {cfg.data.block_size} exceeds the teacher's {limit} positions")
    blocks = {s: pack_blocks(corpus.docs[s], tokenizer, cfg.data.block_size) for s in SPLITS}
    log.info("data: %s documents -> %s blocks of %d tokens", corpus.summary()["documents"],
             {s: len(b) for s, b in blocks.items()}, cfg.data.block_size)
    fingerprint = run_fingerprint(cfg, {s: corpus.docs[s] for s in ("train", "validation")})
    with run_dir_for(cfg, run_dir, fingerprint, overwrite=overwrite):
        return _distil_lm(cfg, run_dir, corpus, blocks, teacher, tokenizer, teacher_name, teacher_file_mb, started)


def _distil_lm(cfg: RunConfig, run_dir: Path, corpus: LMCorpus, blocks: dict[str, LMBlocks], teacher, tokenizer,
               teacher_name: str, teacher_file_mb: float | None, started: float) -> Path:
    """Student, KD and no-KD training, evaluation and report of a causal-LM run, in its run dir."""
    from kdistill.cache import build_topk_cache, default_cache_root
    from kdistill.distill.causal import distill_causal, lm_only_spec
    from kdistill.evaluate import machine_info
    from kdistill.models import dir_size_mb, save_model
    from kdistill.pipeline import make_student, save_history, term_spec
    from kdistill.report import write_report
    from kdistill.student import count_parameters, describe_student

    calibration = blocks["train"].batch(slice(0, 8))
    student, init_layers = make_student(cfg, teacher, calibration)
    shapes = describe_student(teacher, student)
    shapes["teacher_block_params"] = block_parameters(teacher)
    shapes["student_block_params"] = block_parameters(student)
    shapes["block_param_ratio"] = shapes["student_block_params"] / shapes["teacher_block_params"]
    baseline = copy.deepcopy(student) if cfg.distill.baseline else None  # same init: the loss is the only change
    spec = term_spec(cfg, teacher, student, init_layers)

    cache, cache_info = None, None
    use_cache = cfg.distill.cache_teacher == "on" or (cfg.distill.cache_teacher == "auto"
                                                      and not spec.needs_teacher_features)
    kd_terms = set(spec.active) - {"lm"}
    if use_cache and spec.needs_teacher_features:
        raise UserError("distill.cache_teacher: on stores top-k logits only, but the loss terms "
                        f"{sorted(set(spec.active) & {'hidden_mse', 'hidden_cosine', 'embedding_mse'})} need the "
                        "teacher's hidden states; use auto or off")
    if use_cache and kd_terms:
        with_bf16 = torch.bfloat16 if cfg.train.mixed_precision == "bf16" else None
        t0 = time.perf_counter()
        root = default_cache_root()
        cache = build_topk_cache(teacher, blocks["train"].input_ids, blocks["train"].attention_mask,
                                 k=cfg.distill.cache_top_k, root=root, batch_size=max(1, cfg.train.batch_size),
                                 autocast_dtype=with_bf16)
        cache_info = {"k": cache.k, "path": str(cache.path), "seconds": time.perf_counter() - t0,
                      "status": "reused" if cache.reused else "built", "key": cache.key}

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = {"pad_id": pad_id, "eos_id": tokenizer.eos_token_id}
    history = distill_causal(student, teacher, blocks["train"], blocks["validation"], spec=spec,
                             distill=cfg.distill, train=cfg.train, cache=cache, name="student",
                             log_dir=run_dir / "logs", **ids)
    save_history(run_dir, history)
    meta = {"task": "causal-lm", "max_length": cfg.data.block_size, "strategy": cfg.distill.strategy,
            "losses": cfg.distill.losses, "teacher": teacher_name, "student_init": shapes["init"],
            "train_wall_time_s": history.wall_time_s}
    save_model(student, tokenizer, run_dir / "student", {"role": "student", **meta})
    models = {"teacher": teacher, "student": student}
    histories = {"teacher": None, "student": history}
    if baseline is not None:
        base_history = distill_causal(baseline, None, blocks["train"], blocks["validation"],
                                      spec=lm_only_spec(), distill=cfg.distill, train=cfg.train, cache=None,
                                      name="baseline", log_dir=run_dir / "logs", **ids)
        save_history(run_dir, base_history)
        save_model(baseline, tokenizer, run_dir / "baseline",
                   {**meta, "role": "no-KD baseline", "losses": {"lm": 1.0},
                    "train_wall_time_s": base_history.wall_time_s})
        models["baseline"], histories["baseline"] = baseline, base_history

    results = {}
    for name, model in models.items():
        ppl = perplexity(model, blocks["test"], batch_size=max(1, cfg.eval.throughput_batch_size))
        params = count_parameters(model)
        results[name] = {
            "perplexity": ppl["perplexity"], "nll_per_token": ppl["loss"], "n_test_tokens": ppl["tokens"],
            "params": params, "block_params": block_parameters(model),
            "size_mb": dir_size_mb(run_dir / name) if name != "teacher" else params * 4 / 2**20,
            "train_wall_time_s": histories[name].wall_time_s if histories[name] else None,
        }
        if name == "teacher":
            results[name]["source_file_mb"] = teacher_file_mb
        if histories[name] and histories[name].evals:
            results[name]["validation_perplexity"] = histories[name].evals[-1]["perplexity"]
    for name, numbers in compare_lm_speed(models, blocks["test"], cfg.eval, pad_id).items():
        results[name].update(numbers)
    t = results["teacher"]
    for r in results.values():
        r["speedup_vs_teacher"] = r["generate_tokens_per_s"] / t["generate_tokens_per_s"]
        r["size_ratio_vs_teacher"] = t["params"] / r["params"]
        r["perplexity_ratio_vs_teacher"] = r["perplexity"] / t["perplexity"]

    metrics = {
        "run": cfg.name,
        "task": "causal-lm",
        "strategy": cfg.distill.strategy,
        "teacher": teacher_name,
        "data": {**corpus.summary(), "block_size": cfg.data.block_size,
                 "blocks": {s: len(b) for s, b in blocks.items()}, "tokens": {s: b.tokens for s, b in blocks.items()}},
        "student_shape": shapes,
        "models": results,
        "samples": sample_generations(models, tokenizer, threads=cfg.eval.num_threads),
        "teacher_cache": cache_info,
        "machine": {**machine_info(), "host": socket.gethostname(),
                    "eval_threads": cfg.eval.num_threads or torch.get_num_threads(),
                    "world_size": world_size()},
        "units": {"perplexity": "exp(nats/token)", "nll_per_token": "nats", "generate_tokens_per_s": "tokens/s",
                  "score_tokens_per_s": "tokens/s", "ms_per_token_batch1": "ms", "size_mb": "MiB",
                  "train_wall_time_s": "s"},
        "total_wall_time_s": time.perf_counter() - started,
    }
    atomic_write_json(run_dir / "metrics.json", metrics)
    write_report([run_dir])
    log.info("causal-lm run done in %.0f s: %s", metrics["total_wall_time_s"],
             json.dumps({n: round(r["perplexity"], 2) for n, r in results.items()}))
    return run_dir
