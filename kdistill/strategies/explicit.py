"""Explicit distillation: a frozen teacher, a student that learns its soft outputs, internals and the labels.

The teacher never learns here: it is in eval mode, its parameters do not require grad, and it runs under
`torch.no_grad()`. So its outputs are the same every epoch, and with `distill.cache_teacher: auto` (the default)
they are computed once before training and read back at each step instead of running the teacher:

- logits (terms kd/ce; every teacher of a multi-teacher run): in memory, (N, C) float32; a teacher that gives
  logits alone is also stored for later runs (`cache.logits_cache_root()`, keyed by its weights and the rows'
  tokens): other seeds and recipes over the same rows read them instead of running it (a big teacher labels a
  transfer set once);
  a token classifier's per-token logits (N, L_max, C) float32, each example at its positions (right
  padding), cut to each batch's length;
- hidden states (hidden_mse, hidden_cosine, embedding_mse, cls_pkd): only the main teacher's layers the terms
  read (`TermSpec.teacher_hidden_layers`), fp16, memory-mapped from a temporary directory removed when training
  ends (`cache.FeatureStore`: each example's real tokens, put back into each batch's padding);
- pooled sentence embeddings (task: embedding; pooled_* terms): in memory, (N, D) float32, as logits are;
- attention maps and Q/K/V (attention_*, minilm_*) are never cached: (N, heads, L, L) per layer is far too big.
  With such a term the teacher runs every step and nothing is cached (`on` is then an error); likewise for cls_pkd
  under a left-padding tokenizer (position 0 is then a pad token, whose teacher state depends on the batch).

The hidden states are cached only when they fit `FEATURE_CACHE_MAX_BYTES` (and the temp dir's free space);
otherwise the teacher runs every step, with a log line saying why. Built in row order, the cache is looked up by
each example's `idx`, so it works with any batch order, gradient accumulation and several processes (each process
builds and holds all rows, in a temp dir of its own).

A student over another vocabulary than the teachers' (`teacher_tokenizer`) reads its own tokenization of each
example; the teachers read theirs once, into the cache, which must then hold every output the terms read: logits,
and position 0 for cls_pkd (the one hidden term whose positions need not align; see pipeline.check_tokenizers).

The step loop is the engine every strategy shares (engine.py: micro-batches, the step-normalised loss, AdamW and
schedule, logging, validation and early stopping, checkpoints: with `checkpoints` it writes resumable state every
`train.checkpoint_every` steps and at epoch ends, and continues from the last one). What is explicit's own is here:
the frozen teacher and its cache. It also runs in several processes (DDP; see training.py for how a batch is
split).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kdistill import losses
from kdistill.cache import FeatureStore, logits_cache_root, logits_key, read_teacher_logits, write_teacher_logits
from kdistill.strategies.phase import Phase
from kdistill.errors import UserError
from kdistill.features import Features, Pooling, capture, ensure_eager_attention
from kdistill.io import atomic_dir
from kdistill.terms import TermSpec, compute_terms, step_temperature, uncacheable_terms
from kdistill.training import (
    GroupStream,
    History,
    make_learner,
    make_loader,
    make_loaders,
    validation_metrics,
    embedding_validation_metrics,
    cosine_then_mse,
    accuracy_then_loss,
)

log = logging.getLogger(__name__)

FEATURE_CACHE_MAX_BYTES = 4 * 2**30
"""The largest teacher hidden-state cache built (on disk, memory-mapped). Every epoch reads all of it in a random
order, fast only while it stays in the page cache; past this the teacher runs every step instead."""


def with_index(encoded):
    """Each training example carries its row index, so cached teacher outputs can be looked up."""
    return encoded.add_column("idx", list(range(len(encoded))))


@dataclass
class TeacherCache:
    """The frozen teachers' outputs for every training example, looked up by row index."""

    logits: list[torch.Tensor]
    """Per teacher, (N, C) float32, in row order."""
    features: FeatureStore | None = None
    """The main teacher's hidden states of the layers the terms read; None when they read none."""
    num_hidden_states: int = 0
    """len(hidden_states) of the main teacher (layers + 1), so the cached layers sit at their own indices."""
    pooled: torch.Tensor | None = None
    """(N, D) float32: the main teacher's pooled sentence embeddings (task: embedding), in row order."""

    def outputs(self, idx: torch.Tensor, attention_mask: torch.Tensor, device) -> tuple[Features | None, list]:
        """(main teacher's Features or None, each teacher's logits (B, C)) for the batch of rows `idx`."""
        # token classification: (N, L_max, C) per-token logits, cut to this batch's padded length
        logits = [(c[idx.cpu(), : attention_mask.shape[1]] if c.dim() == 3 else c[idx.cpu()]).to(device)
                  for c in self.logits]
        if self.pooled is not None:  # a sentence encoder: no logits, no hidden states cached
            return Features(logits=None, pooled=self.pooled[idx.cpu()].to(device),
                            attention_mask=attention_mask), logits
        if self.features is None:
            return None, logits
        layers = self.features.gather(idx, attention_mask, device)
        # unread layers stay None: compute_terms reads only the indices the store holds
        hidden = tuple(layers.get(t) for t in range(self.num_hidden_states))
        return Features(logits=logits[0], hidden_states=hidden, attention_mask=attention_mask), logits


def why_not_cached(spec: TermSpec, tokenizer) -> str | None:
    """Why the teacher outputs the active terms read cannot be cached; None when they can."""
    uncached = uncacheable_terms(spec.active)
    if uncached:
        return (f"the loss terms {uncached} need the teacher's attention maps or Q/K/V, which are not cached "
                "((N, heads, L, L) per layer is too large)")
    if "cls_pkd" in spec.active and getattr(tokenizer, "padding_side", "right") == "left":
        return ("cls_pkd reads position 0, which left padding fills with pad tokens whose teacher states depend on "
                "the batch")
    return None


def plan_cache(spec: TermSpec, mode: str, tokenizer, teacher, lengths: list[int], work_dir: Path,
               accelerator) -> bool:
    """Whether to cache the teacher's outputs (`mode`: distill.cache_teacher); the log says why not, and how big
    the hidden states are. Every process decides alike; the main one tells."""
    tell = log.info if accelerator.is_main_process else log.debug
    if mode == "off":
        return False
    reason = why_not_cached(spec, tokenizer)
    if reason and mode == "on":
        raise UserError(f"distill.cache_teacher: on, but {reason}; use auto or off")
    if reason:
        tell("teacher cache: off: %s; the teacher runs every step", reason)
        return False
    layers, first_only = spec.teacher_hidden_layers
    if not layers:
        return True  # logits only: (N, C), small
    size = FeatureStore.estimate_bytes(lengths, len(layers), teacher.config.hidden_size, first_only=first_only)
    free = shutil.disk_usage(work_dir).free
    limit, limit_is = min((FEATURE_CACHE_MAX_BYTES, "FEATURE_CACHE_MAX_BYTES"), (free, f"free space in {work_dir}"))
    tell("teacher cache: hidden states of teacher layers %s%s for %d examples: %.1f MiB in fp16 (limit %.0f MiB, %s)",
         layers, ", position 0 only" if first_only else "", len(lengths), size / 2**20, limit / 2**20, limit_is)
    if size > limit:
        if accelerator.is_main_process:
            (log.warning if mode == "on" else log.info)(
                "teacher cache: off: the hidden states would exceed the limit (%s); the teacher runs every step",
                limit_is)
        return False
    return True


@torch.no_grad()
def cache_teacher_outputs(teachers, encoded_train, tokenizer, accelerator, *, spec: TermSpec,
                          store_dir: Path | None = None, pooling: Pooling | None = None,
                          logits_root: Path | None = None) -> TeacherCache:
    """Run each frozen teacher once over every training example (every process: all rows) and keep its outputs.

    Logits of every teacher, in memory. With hidden terms active, the main teacher's hidden states of the layers
    they read, written atomically as a FeatureStore at `store_dir` (which must not exist yet) and memory-mapped.
    `encoded_train` carries the `idx` column (`with_index`): rows land at their index, whatever the batch order.
    `pooling` (task: embedding): the main teacher's pooled sentence embeddings instead of logits.
    `logits_root` (cache.logits_cache_root()): where a teacher's logits are stored for later runs (seeds, the
    transfer set a big teacher labels once) and read back from, keyed by its weights and the rows' tokens
    (cache.logits_key); only for a teacher that gives logits alone here (its hidden states or pooled embeddings
    are not stored). None: computed, not stored.
    """
    layers, first_only = spec.teacher_hidden_layers
    if layers and store_dir is None:
        raise ValueError("cache_teacher_outputs: the hidden states need a store_dir")
    start = time.perf_counter()
    loader = make_loader(encoded_train, tokenizer, 64, seed=0, shuffle=False)
    n, device = len(encoded_train), accelerator.device
    logits: list[torch.Tensor | None] = [None] * len(teachers)
    num_hidden_states = 0
    pooled = None
    # autocast: train.mixed_precision, as for the live teacher's forward
    with atomic_dir(store_dir) if layers else nullcontext() as tmp, accelerator.autocast():
        store = None
        if layers:
            lengths = [len(ids) for ids in encoded_train["input_ids"]]
            store = FeatureStore.create(tmp, lengths, layers, teachers[0].config.hidden_size, first_only=first_only)
        # a teacher whose logits are all it gives here reads them from an earlier run's store, if one has them
        keys = {k: logits_key(t, encoded_train, autocast=accelerator.mixed_precision) for k, t in enumerate(teachers)
                if k > 0 or (store is None and pooling is None)} if logits_root is not None else {}
        for k, key in keys.items():
            logits[k] = read_teacher_logits(logits_root, key)
        to_run = [k for k in range(len(teachers)) if logits[k] is None]
        for k in to_run:
            teachers[k].to(device)
        for batch in tqdm(loader if to_run else [], desc="caching teacher outputs", leave=False,
                          disable=None if accelerator.is_main_process else True):
            batch.pop("labels")
            rows = batch.pop("idx")
            batch = {k: v.to(device) for k, v in batch.items()}
            for k in to_run:
                teacher = teachers[k]
                if k == 0 and pooling is not None:  # a sentence encoder: its pooled embedding is the target
                    out = capture(teacher, batch, hidden_states=False, pooling=pooling).pooled
                    if pooled is None:
                        pooled = torch.empty(n, out.shape[-1])
                    pooled[rows] = out.float().cpu()
                    continue
                if k == 0 and store is not None:  # one forward gives the main teacher's logits and hidden states
                    feats = capture(teacher, batch, hidden_states=True)
                    num_hidden_states = len(feats.hidden_states)
                    store.put(rows, {t: feats.hidden_states[t] for t in layers}, batch["attention_mask"])
                    out = feats.logits
                else:
                    out = teacher(**batch).logits
                if logits[k] is None:
                    # token classification: every token's logits, each example at its positions, zeros past its end
                    logits[k] = torch.empty(n, out.shape[-1]) if out.dim() == 2 else \
                        torch.zeros(n, max(len(ids) for ids in encoded_train["input_ids"]), out.shape[-1])
                if out.dim() == 3:
                    logits[k][rows, : out.shape[1]] = out.float().cpu()
                else:
                    logits[k][rows] = out.float().cpu()
        if store is not None:
            store.flush()
            del store  # closes the write maps before the directory is renamed into place
    for k in to_run:
        if k in keys and accelerator.is_main_process:
            write_teacher_logits(logits_root, keys[k], logits[k])
    features = FeatureStore.open(store_dir) if layers else None
    if accelerator.is_main_process:
        stored = len(teachers) - len(to_run)
        log.info("teacher cache: %d examples through %d teacher(s) in %.1f s%s%s", n, len(to_run),
                 time.perf_counter() - start, f"; hidden states in {store_dir}" if layers else "",
                 f"; the logits of {stored} read from {logits_root}" if stored else "")
    return TeacherCache([c for c in logits if c is not None], features, num_hidden_states, pooled)


def distill_explicit(phase: Phase, *, work_dir: Path | None = None, teacher_tokenizer=None, teacher_train=None,
                     pooling: Pooling | None = None, keep_best: bool = True,
                     teacher_logits: torch.Tensor | None = None) -> History:
    """Train `phase.student` against its frozen `phase.teachers` (the first is the main one; several average their
    soft targets).

    `phase.data`: the student's tokenization of the splits (train, validation; data.tokenize_splits).
    Leaves the best validation weights in the student; returns the history with every loss term per step.
    `phase.checkpoints`: where to save resumable state, and whether to continue from the last one saved there.
    `work_dir`: where the teacher hidden-state cache's temporary directory goes (default: the system's, $TMPDIR).
    `tokenizer`: the student's; `teacher_tokenizer` and `teacher_train` (the teachers' tokenization of the same
    training rows, in the same order), where the teachers' vocabulary differs from the student's.
    `pooling` (task: embedding): teacher and student are sentence encoders pooled alike; the pooled_* terms read
    their embeddings, the labels are ignored, and validation scores the student's agreement with the teacher
    (`training.embedding_validation_metrics`).
    A token classifier's examples carry one label per token: its teacher cache then holds per-token logits,
    (N, L_max, C).
    `keep_best`: False leaves the final weights (a first stage whose validation score says nothing yet).
    `teacher_logits`: (N, C), the soft labels of a teacher that is not a model here (a prompted LLM's label scores,
    cache/label_scores.py), in the training rows' order; they are the cache, `phase.teachers` is then [].

    Why one long function: a strategy reads top to bottom (set-up, teacher cache, loop), as its siblings do.
    """
    student, teachers, tokenizer, encoded = phase.student, phase.teachers, phase.tokenizer, phase.data
    spec, distill, train, task = phase.spec, phase.distill, phase.train, phase.task
    accelerator = phase.start()
    needs_teacher = "kd" in spec.active or spec.needs_teacher_features or spec.needs_pooled
    if spec.needs_pooled and pooling is None:
        raise ValueError(f"loss terms {sorted(spec.active)} read pooled sentence embeddings: give pooling")
    if needs_teacher and not teachers and teacher_logits is None:
        raise ValueError(f"loss terms {sorted(spec.active)} need a teacher")
    if (teacher_tokenizer is None) != (teacher_train is None):
        raise ValueError("distill_explicit: teacher_tokenizer and teacher_train go together")
    for teacher in teachers:
        teacher.eval()  # the teacher never learns: no dropout, no gradient
        teacher.requires_grad_(False)
    if spec.needs_attentions:
        for model in (student, teachers[0]):
            ensure_eager_attention(model)

    encoded_train = with_index(encoded["train"])
    # the same rows in the same order: the teachers' outputs by row index fit the student's batches
    teacher_train = encoded_train if teacher_train is None else with_index(teacher_train)
    work_dir = Path(work_dir or tempfile.gettempdir())
    work_dir.mkdir(parents=True, exist_ok=True)
    with ExitStack() as cleanup:  # the cache's temp dir goes when training ends, also when it fails
        cached, store_dir = None, None
        lengths = [len(ids) for ids in teacher_train["input_ids"]]
        teachers_read = teacher_tokenizer or tokenizer
        if teacher_logits is not None:
            if len(teacher_logits) != len(encoded_train):
                raise ValueError(f"teacher_logits: {len(teacher_logits)} rows for {len(encoded_train)} training rows")
            cached = TeacherCache([teacher_logits.float()])
        elif needs_teacher and plan_cache(spec, distill.cache_teacher, teachers_read, teachers[0], lengths, work_dir,
                                          accelerator):
            if spec.teacher_hidden_layers[0]:  # one per process: each holds all rows
                tmp = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="kdistill-teacher-cache-",
                                                                        dir=work_dir))
                store_dir = Path(tmp) / "features"
            with torch.random.fork_rng(devices=[]):  # (its loader draws a seed): the same run with or without it
                cached = cache_teacher_outputs(teachers, teacher_train, teachers_read, accelerator, spec=spec,
                                               store_dir=store_dir, pooling=pooling, logits_root=logits_cache_root())
        elif needs_teacher and teacher_tokenizer is not None:  # the teachers cannot read the student's batches
            raise UserError("the student reads another vocabulary than the teacher, so the teacher's outputs must be "
                            "cached, and they are not (distill.cache_teacher, and the log line above, say why)")

        train_loader, val_loader, total_steps, evals_at = make_loaders(encoded_train, encoded["validation"],
                                                                       tokenizer, train, accelerator)
        learner = make_learner(student, phase.name, lr=train.lr, total_steps=total_steps, train=train,
                               accelerator=accelerator, log_dir=phase.log_dir, patience=train.early_stopping_patience,
                               extra=spec.projections,
                               score=accuracy_then_loss if pooling is None else cosine_then_mse, keep_best=keep_best)
        student = learner.model  # (wrapped for DDP when several processes run)
        if cached is None or pooling is not None:  # (embedding: validation runs the teacher)
            teachers = [t.to(accelerator.device) for t in teachers]
        if pooling is None:
            def validate(model):
                return validation_metrics(model, val_loader, accelerator)
        else:
            def validate(model):
                return embedding_validation_metrics(model, teachers[0], val_loader, accelerator, pooling)
        engine = phase.engine(accelerator, [learner], GroupStream(train_loader, train.grad_accum,
                                                                  device=accelerator.device),
                              total_steps, evals_at, validate, f"distill {phase.name}")
        weights = spec.active
        flags = dict(hidden_states=spec.needs_hidden, attentions=spec.needs_attentions, qkv=spec.needs_qkv,
                     pooling=pooling if spec.needs_pooled else None)

        def take_step(step: int, group: list[dict]) -> None:
            temperature = step_temperature(distill, step, total_steps)

            def terms_of(batch):  # batch: input_ids, attention_mask (B, L), labels, idx (B,)
                labels, idx = batch.pop("labels"), batch.pop("idx")
                teacher_feats, teacher_log_probs, teacher_logits = None, None, []
                if cached is not None:  # from the cache: the teacher does not run at all
                    teacher_feats, teacher_logits = cached.outputs(idx, batch["attention_mask"], accelerator.device)
                elif needs_teacher:  # (without: supervised training, e.g. the no-KD baseline)
                    with torch.no_grad(), accelerator.autocast():  # frozen teacher(s)
                        teacher_feats = capture(teachers[0], batch, **flags).float()
                        teacher_logits = [] if pooling is not None else \
                            [teacher_feats.logits] + [t(**batch).logits.float() for t in teachers[1:]]
                if len(teacher_logits) > 1 or (cached is not None and "kd" in weights):
                    teacher_log_probs = losses.average_teacher_logprobs(
                        teacher_logits, temperature=temperature, weights=distill.teacher_weights)
                student_feats = capture(student, batch, **flags)
                return [(compute_terms(spec, student_feats, teacher_feats, labels, temperature=temperature,
                                       teacher_log_probs=teacher_log_probs, task=task), weights)]

            logged = {}
            engine.backward(group, terms_of, [logged], sync=student)
            engine.apply(learner, step + 1, logged, weights, temperature=temperature)

        history, = engine.run(take_step)
    return history
