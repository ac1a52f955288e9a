"""The parts the step engine (engine.py) is built from: processes and seeds, loaders and length-grouped samplers, the
stream of a step's micro-batches (GroupStream), the units a term counts in a batch (batch_units, step_units),
optimiser and schedule, a learning model (Learner: its optimiser, history, early stopping), validation metrics.

Loss normalisation: every loss returns (sum, count). A term's count is a fixed multiple of a *unit* of the
batch (terms.UNITS: rows, labeled rows, tokens, token pairs, next-token targets), so the engine divides each
micro-batch's sum by that term's count over the whole optimizer step, across micro-batches and processes
(terms.step_loss). Gradient accumulation and several processes then give the same loss as one big batch.

Several processes (`torchrun` / `accelerate launch`, DDP): `train.batch_size` stays the number of examples per
optimizer step over all processes. The samplers build the same global micro-batches (batch_size / grad_accum rows)
in every process, in the same seeded order, and each process takes its contiguous share of each one, so N processes
see exactly the data of one process, split N ways; the loss normalisation (global counts, times world_size against
DDP's averaging) makes the step's gradient that of the whole global batch.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast, gather_object
from accelerate.utils import set_seed as accelerate_set_seed
from sklearn.metrics import f1_score
from torch.utils.data import DataLoader, Sampler
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm
from seqeval.metrics import accuracy_score as seqeval_accuracy
from seqeval.metrics import classification_report as seqeval_report
from seqeval.scheme import IOB2
from transformers import DataCollatorForTokenClassification, DataCollatorWithPadding, get_linear_schedule_with_warmup

from kdistill import losses
from kdistill.config import TrainConfig
from kdistill.data import UNLABELED, LMBlocks, next_token_targets
from kdistill.errors import UserError
from kdistill.features import Pooling, capture

log = logging.getLogger(__name__)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    accelerate_set_seed(seed)


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """The run's Accelerator. Our step counts are global optimizer steps (every process takes each one), so the
    schedule steps once per step, not once per process as accelerate would by default."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if AcceleratorState._shared_state.get("_mixed_precision", cfg.mixed_precision) != cfg.mixed_precision:
        # accelerate keeps one precision per process and refuses another; one process may train with several
        # (a benchmark comparing them, a notebook): forget the old one (the processes' state, PartialState, stays)
        AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available(),
                              step_scheduler_with_optimizer=False)
    if accelerator.num_processes > 1 and accelerator.is_main_process:
        log.info("distributed run: world size %d (%s)", accelerator.num_processes, accelerator.distributed_type)
    return accelerator


def process_state() -> PartialState:
    """accelerate's view of the processes of this run. Without CUDA, torchrun and `accelerate launch` start CPU
    processes, which accelerate joins (gloo) only when told cpu=True at its first call: every call goes through here
    or make_accelerator, with the same flag."""
    return PartialState(cpu=not torch.cuda.is_available())


def is_main_process() -> bool:
    """True in the one process that writes files (the only process of a plain run)."""
    return process_state().is_main_process


def world_size() -> int:
    return process_state().num_processes


# ------------------------------------------------------------------------------------------------- batching

class LengthGroupedSampler(Sampler[list[int]]):
    """Batches of similar length (less padding), in a seeded random order that changes every epoch.

    Indices are shuffled, cut into mega-batches of `group` batches, sorted by length inside each, cut into
    batches, and the batches shuffled: randomness of plain shuffling, padding of sorted batching.

    Several processes (`num_replicas` > 1): every process builds the same batches (the same seed, the same epoch)
    and yields its contiguous share of each (`rank`'s slice; shares differ by at most one row). A training batch
    with fewer rows than processes would leave a process without data in a step that all take together, so it is
    dropped (at most num_replicas - 1 examples an epoch); evaluation batches are never dropped, a process just
    yields no empty share.
    """

    def __init__(self, lengths: list[int], batch_size: int, *, seed: int, shuffle: bool = True, group: int = 50,
                 num_replicas: int = 1, rank: int = 0):
        self.lengths, self.batch_size, self.seed, self.shuffle, self.group = lengths, batch_size, seed, shuffle, group
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int | None = None) -> None:
        """Reshuffle for `epoch`; `skip`: batches of it already done (a resumed run), left out of the next pass.

        (accelerate calls set_epoch(epoch) again when it starts iterating; that keeps a pending skip.)"""
        if skip is not None:
            self.skip = skip
        elif epoch != self.epoch:
            self.skip = 0
        self.epoch = epoch

    def _global_batches(self) -> list[list[int]]:
        n = len(self.lengths)
        if not self.shuffle:
            order = sorted(range(n), key=lambda i: -self.lengths[i])
            return [order[i: i + self.batch_size] for i in range(0, n, self.batch_size)]
        rng = random.Random(self.seed + self.epoch)
        idx = list(range(n))
        rng.shuffle(idx)
        mega = self.batch_size * self.group
        batches = []
        for start in range(0, n, mega):
            chunk = sorted(idx[start: start + mega], key=lambda i: -self.lengths[i])
            batches += [chunk[i: i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        rng.shuffle(batches)
        if self.num_replicas > 1:
            batches = [b for b in batches if len(b) >= self.num_replicas]
        return batches

    def _share(self, batch: list[int]) -> list[int]:
        base, extra = divmod(len(batch), self.num_replicas)
        start = self.rank * base + min(self.rank, extra)
        return batch[start: start + base + (self.rank < extra)]

    def _batches(self) -> list[list[int]]:
        shares = (self._share(b) for b in self._global_batches())
        return [s for s in shares if s]

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip = self.skip, 0
        yield from self._batches()[skip:]

    def __len__(self) -> int:
        if self.num_replicas == 1:
            return math.ceil(len(self.lengths) / self.batch_size)
        return len(self._batches())


def make_loader(dataset, tokenizer, batch_size: int, *, seed: int, shuffle: bool,
                accelerator: Accelerator | None = None) -> DataLoader:
    """Dynamic padding + length-grouped batches. `dataset` has input_ids/attention_mask/labels columns.

    The collator follows the labels: one per example (classification) pads the inputs alone; a list per example
    (token classification, `has_token_labels`) pads the labels too, with -100 (DataCollatorForTokenClassification).

    `batch_size` counts the rows of a batch over all processes; with an `accelerator` of several processes each
    process loads its share (see LengthGroupedSampler).
    """
    lengths = [len(x) for x in dataset["input_ids"]]
    shards = dict(num_replicas=accelerator.num_processes, rank=accelerator.process_index) if accelerator else {}
    sampler = LengthGroupedSampler(lengths, batch_size, seed=seed, shuffle=shuffle, **shards)
    collate = DataCollatorForTokenClassification(tokenizer, return_tensors="pt") if has_token_labels(dataset) \
        else DataCollatorWithPadding(tokenizer, return_tensors="pt")
    return DataLoader(dataset.with_format("python"), batch_sampler=sampler, collate_fn=collate)


def has_token_labels(dataset) -> bool:
    """Whether `dataset`'s examples carry one label per token (a list: token classification)."""
    return "labels" in dataset.column_names and len(dataset) > 0 and isinstance(dataset[0]["labels"], list)


def set_loader_epoch(loader, epoch: int, skip: int = 0) -> None:
    """Reshuffle for a new epoch (accelerate may wrap our sampler); `skip` the first batches of the epoch (our
    LengthGroupedSampler only)."""
    if hasattr(loader, "set_epoch"):  # accelerate's loader: keeps its own epoch count, which it applies on iter()
        loader.set_epoch(epoch)
    sampler = getattr(loader, "batch_sampler", None)
    sampler = getattr(sampler, "batch_sampler", sampler)
    if skip:
        sampler.set_epoch(epoch, skip=skip)
    elif hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


class GroupStream:
    """A step's micro-batches (`grad_accum` of them), epoch after epoch, reshuffled each epoch, for as long as asked;
    it knows where it is: `epoch`, and `done`, the steps (groups) of that epoch already taken. That is the data
    position a checkpoint saves; `seek` goes back to it without loading the batches before it.

    `device`: where to put each batch (for loaders that accelerate did not prepare)."""

    def __init__(self, loader, grad_accum: int, *, device: torch.device | None = None):
        self.loader, self.grad_accum, self.device = loader, grad_accum, device
        self.per_epoch = math.ceil(len(loader) / grad_accum)
        self.epoch, self.done = 0, 0
        self._epoch_batches = None  # the open epoch's batches

    @property
    def at_epoch_end(self) -> bool:
        return self.done >= self.per_epoch

    @property
    def position(self) -> dict[str, int]:
        """Where the next step starts: epoch, steps and batches of it done, and the sampler's epoch (its seed)."""
        epoch, done = (self.epoch + 1, 0) if self.at_epoch_end else (self.epoch, self.done)
        return {"epoch": epoch, "steps_done": done, "batches_done": done * self.grad_accum, "sampler_epoch": epoch}

    def seek(self, position: dict[str, int]) -> None:
        """Go to a saved `position`. Call it before restoring the RNG states: an epoch under way opens here."""
        self.epoch, self.done = position["epoch"], position["steps_done"]
        self._epoch_batches = None
        if self.done:
            self.start_epoch()

    def start_epoch(self) -> None:
        """Reshuffle for `epoch`, skip the batches of it already done, and open the loader. torch's DataLoader draws
        a seed from the global RNG when it opens, so a resumed run opens an epoch under way before restoring the RNG
        states, as the uninterrupted run had opened it before saving them: dropout then draws the same masks."""
        set_loader_epoch(self.loader, self.epoch, skip=self.done * self.grad_accum)
        self._epoch_batches = iter(self.loader)

    def __iter__(self) -> Iterator[list[dict]]:
        while True:
            if self._epoch_batches is None:
                self.start_epoch()
            group = list(itertools.islice(self._epoch_batches, self.grad_accum))
            if not group:  # the epoch is over
                if self.done == 0:
                    raise UserError("train: the training split gives no batch")
                self.epoch, self.done, self._epoch_batches = self.epoch + 1, 0, None
                continue
            self.done += 1
            if self.device is not None:
                group = [{k: v.to(self.device) for k, v in batch.items()} for batch in group]
            yield group


def batch_units(batch: dict) -> dict[str, torch.Tensor]:
    """The units a loss term can count (terms.UNITS): examples (rows), labeled examples (tokens: labels >= 0),
    scored tokens (labels != UNLABELED: the labeled ones and a transfer sentence's TRANSFER ones), real, unpadded
    tokens, pairs of real tokens in one example, and, for a causal-LM batch (one with `valid`), its next-token targets
    (and its targets aligned with a teacher over another vocabulary, where it has `aligned`).

    Call it before the labels are popped: without them every row counts as labeled."""
    mask = batch["attention_mask"]
    labels = batch.get("labels")
    rows = torch.tensor(float(mask.shape[0]))
    labeled = (labels >= 0).sum().float().cpu() if labels is not None else rows
    scored = (labels != UNLABELED).sum().float().cpu() if labels is not None else rows
    # token_pairs: (query, key) pairs of real tokens, Σ_b n_b², which an attention map's elements count
    units = {"rows": rows, "labeled": labeled, "scored": scored, "tokens": mask.sum().float(),
             "token_pairs": (mask.sum(1).float() ** 2).sum()}
    if "valid" in batch:
        units["targets"] = batch["valid"].sum().float()
    if "aligned" in batch:  # (3, P): row, teacher and student position of the aligned targets
        units["aligned"] = torch.tensor(float(batch["aligned"].shape[1]))
    return units


def step_units(group: list[dict], accelerator: Accelerator) -> dict[str, torch.Tensor]:
    """Units summed over a step's micro-batches and over all processes."""
    totals = defaultdict(float)
    for batch in group:
        for k, v in batch_units(batch).items():
            totals[k] += float(v)
    keys = sorted(totals)
    t = torch.tensor([totals[k] for k in keys], device=accelerator.device)
    t = accelerator.reduce(t, reduction="sum")
    return {k: t[i] for i, k in enumerate(keys)}


# ------------------------------------------------------------------------------------------ optimiser, plan

def plan_steps(num_batches: int, grad_accum: int, epochs: float, max_steps: int | None) -> int:
    per_epoch = math.ceil(num_batches / grad_accum)
    total = max_steps if max_steps else math.ceil(per_epoch * epochs)
    if total < 1:
        raise UserError("train: no optimizer step to run (too little data for batch_size x grad_accum?)")
    return total


def make_optimizer(params, *, lr: float, weight_decay: float, total_steps: int, warmup_ratio: float):
    """AdamW (no decay on biases and LayerNorm) with linear warmup then linear decay.

    The fused kernel is used where every parameter allows it: on CPU the default multi-tensor step took 4.7 s for
    a 64M-parameter model on 2 cores, the fused one 0.13 s; same update rule.
    """
    decay, no_decay = [], []
    for name, p in params:
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    fused = all(p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") for p in decay + no_decay)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr, fused=fused or None)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(warmup_ratio * total_steps), total_steps)
    return optimizer, scheduler


# ----------------------------------------------------------------------------------------------- logging

@dataclass
class History:
    """Per-step loss terms and per-evaluation metrics of one training run, for plots and the report."""

    name: str
    steps: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    wall_time_s: float = 0.0
    writer: object | None = None
    log_dir: Path | None = None

    def open_tensorboard(self, log_dir: Path | None, accelerator: Accelerator, purge_step: int | None = None) -> None:
        """TensorBoard events under log_dir/name (main process only). `purge_step`: a resumed run drops the events
        its killed predecessor logged from that step on, so the curves do not double back."""
        self.close()
        self.log_dir = log_dir
        if log_dir is not None and accelerator.is_main_process:
            self.writer = SummaryWriter(str(Path(log_dir) / self.name), purge_step=purge_step)

    def log_step(self, step: int, values: dict[str, float]) -> None:
        self.steps.append({"step": step, **values})
        if self.writer:
            for k, v in values.items():
                self.writer.add_scalar(f"train/{k}", v, step)

    def log_eval(self, step: int, values: dict[str, float]) -> None:
        self.evals.append({"step": step, **values})
        if self.writer:
            for k, v in values.items():
                self.writer.add_scalar(f"validation/{k}", v, step)

    def close(self) -> None:
        if self.writer:
            self.writer.close()
            self.writer = None

    def to_dict(self) -> dict:
        return {"name": self.name, "steps": self.steps, "evals": self.evals, "wall_time_s": self.wall_time_s}

    def load_dict(self, saved: dict) -> None:
        """Continue from a checkpoint's history (`to_dict`)."""
        self.steps, self.evals, self.wall_time_s = list(saved["steps"]), list(saved["evals"]), saved["wall_time_s"]


# ---------------------------------------------------------------------------------------------- validation

@torch.no_grad()
def predict_logits(model, loader, accelerator: Accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of a whole split, in every process. With several processes `loader` is one made with
    this `accelerator` (each process holds a disjoint share of each batch, see LengthGroupedSampler): the shares
    are gathered, each example once."""
    was_training = model.training
    model.eval()
    parts = []
    for batch in loader:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        labels = batch.pop("labels")
        parts.append((model(**batch).logits.float().cpu(), labels.cpu()))
    model.train(was_training)
    if accelerator.num_processes > 1:
        parts = gather_object(parts)
    return torch.cat([logits for logits, _ in parts]), torch.cat([labels for _, labels in parts])


def validation_metrics(model, loader, accelerator: Accelerator) -> dict[str, float]:
    """Accuracy, macro F1 and loss of a classifier; entity F1, token accuracy and loss of a token classifier
    (`token_validation_metrics`, chosen by the loader's labels)."""
    if has_token_labels(loader.dataset):
        return token_validation_metrics(model, loader, accelerator)
    logits, labels = predict_logits(model, loader, accelerator)
    preds = logits.argmax(-1)
    return {
        "accuracy": float((preds == labels).float().mean()),
        "macro_f1": float(f1_score(labels.numpy(), preds.numpy(), average="macro", zero_division=0)),
        "loss": float(torch.nn.functional.cross_entropy(logits, labels)),
    }


def accuracy_then_loss(metrics: dict[str, float]) -> tuple[float, ...]:
    """Classifiers: higher validation accuracy is better (token classifiers: entity F1); ties go to the lower
    loss."""
    return (metrics.get("entity_f1", metrics["accuracy"]), -metrics["loss"])


# ------------------------------------------------------------------------ token classification: validation


def tag_sequences(pred_ids, label_ids, label_names: list[str]) -> tuple[list[list[str]], list[list[str]]]:
    """(predicted tags, true tags) per example, at the labeled positions only (label != -100: the first sub-token
    of each word, no padding). pred_ids, label_ids: (B, L) or lists of per-example lists."""
    preds, trues = [], []
    for p_row, y_row in zip(pred_ids, label_ids):
        pairs = [(int(p), int(y)) for p, y in zip(p_row, y_row) if int(y) != UNLABELED]
        preds.append([label_names[p] for p, _ in pairs])
        trues.append([label_names[y] for _, y in pairs])
    return preds, trues


def entity_metrics(true_tags: list[list[str]], pred_tags: list[list[str]]) -> dict:
    """Entity-level precision / recall / F1 per type and micro-averaged (seqeval, strict IOB2: an entity counts
    when its type and both boundaries match exactly), and token accuracy."""
    report = seqeval_report(true_tags, pred_tags, mode="strict", scheme=IOB2, output_dict=True, zero_division=0)
    micro = report.get("micro avg", {"precision": 0.0, "recall": 0.0, "f1-score": 0.0})
    per_type = {k: {"precision": float(v["precision"]), "recall": float(v["recall"]), "f1": float(v["f1-score"]),
                    "support": int(v["support"])}
                for k, v in report.items() if not k.endswith(" avg")}
    return {"entity_precision": float(micro["precision"]), "entity_recall": float(micro["recall"]),
            "entity_f1": float(micro["f1-score"]), "token_accuracy": float(seqeval_accuracy(true_tags, pred_tags)),
            "per_type": per_type}


@torch.no_grad()
def token_validation_metrics(model, loader, accelerator: Accelerator) -> dict[str, float]:
    """Entity F1 (seqeval), token accuracy (as `accuracy`) and the CE loss per labeled token of a token classifier
    over a whole split (every process: the shares are gathered)."""
    was_training = model.training
    model.eval()
    names = [getattr(model, "module", model).config.id2label[i]
             for i in range(getattr(model, "module", model).config.num_labels)]
    parts, total, count = [], 0.0, 0
    for batch in loader:
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        s, c = losses.hard_ce(logits, labels)
        total, count = total + float(s), count + int(c)
        parts.append(tag_sequences(logits.argmax(-1).cpu().tolist(), labels.cpu().tolist(), names))
    model.train(was_training)
    if accelerator.num_processes > 1:
        parts = gather_object(parts)
        total, count = [sum(x) for x in zip(*gather_object([(total, count)]))]
    preds = [row for p, _ in parts for row in p]
    trues = [row for _, t in parts for row in t]
    m = entity_metrics(trues, preds)
    return {"entity_f1": m["entity_f1"], "accuracy": m["token_accuracy"], "loss": total / max(count, 1)}


@torch.no_grad()
def embedding_validation_metrics(model, teacher, loader, accelerator: Accelerator, pooling: Pooling
                                 ) -> dict[str, float]:
    """A sentence-embedding student's agreement with its frozen teacher on a held-out split (task: embedding;
    there are no labels): the mean cosine between the two models' pooled embeddings of each text and their
    per-element mean squared error. Both models read the same batches (one tokenization)."""
    was_training = model.training
    model.eval()
    parts = []
    for batch in loader:
        batch = {k: v.to(accelerator.device) for k, v in batch.items() if k != "labels"}
        s = capture(model, batch, hidden_states=False, pooling=pooling).pooled.float()
        t = capture(teacher, batch, hidden_states=False, pooling=pooling).pooled.float()
        parts.append((torch.nn.functional.cosine_similarity(s, t, dim=-1).sum().item(),
                      (s - t).pow(2).sum().item(), s.shape[0], t.numel()))
    model.train(was_training)
    if accelerator.num_processes > 1:
        parts = gather_object(parts)
    rows, elements = sum(p[2] for p in parts), sum(p[3] for p in parts)
    return {"cosine": sum(p[0] for p in parts) / max(rows, 1), "mse": sum(p[1] for p in parts) / max(elements, 1)}


def cosine_then_mse(metrics: dict[str, float]) -> tuple[float, ...]:
    """Sentence-embedding students: higher cosine agreement with the teacher is better; ties go to the lower MSE."""
    return (metrics["cosine"], -metrics["mse"])


@torch.no_grad()
def perplexity(model, blocks: LMBlocks, batch_size: int = 8, byte_lengths: Tensor | None = None) -> dict:
    """A causal LM's held-out next-token NLL (nats/token, over the positions data.next_token_targets counts), its
    exp (perplexity) and the number of predicted tokens: the causal loop's validation and the test metric.

    With `byte_lengths` ((V,) bytes per token id, tokenalign.token_byte_lengths) also the predicted tokens' bytes
    and bits per byte = Σ NLL / (ln 2 × Σ bytes), the same sums over the same positions."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count, nbytes = 0.0, 0, 0
    try:
        for start in range(0, len(blocks), batch_size):
            batch = blocks.batch(slice(start, start + batch_size))
            labels, valid = next_token_targets(batch["input_ids"], batch["attention_mask"])
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float()
            s, c = losses.lm_ce_tokens(logits, labels.to(device), mask=valid.to(device))
            total += float(s)
            count += int(c)
            if byte_lengths is not None:
                nbytes += int(byte_lengths[labels[valid]].sum())
    finally:
        model.train(was_training)
    loss = total / max(count, 1)
    out = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}
    if byte_lengths is not None:
        out |= {"bytes": nbytes, "bits_per_byte": total / (math.log(2) * max(nbytes, 1))}
    return out


class EarlyStopping:
    """Keeps the best weights by a validation score (higher is better); says when patience runs out."""

    def __init__(self, patience: int | None,
                 score: Callable[[dict[str, float]], tuple[float, ...]] = accuracy_then_loss, *,
                 keep_best: bool = True):
        self.patience = patience
        self.score = score
        self.keep_best = keep_best
        """False: the final weights are kept (no copy of the best ones is made)."""
        self.best: tuple[float, ...] | None = None
        self.best_state: dict | None = None
        self.bad_evals = 0

    def update(self, model, metrics: dict[str, float]) -> bool:
        """Record an evaluation; True when training should stop."""
        score = self.score(metrics)
        if self.best is None or score > self.best:
            self.best, self.bad_evals = score, 0
            if self.keep_best:
                unwrapped = getattr(model, "module", model)
                self.best_state = {k: v.detach().clone() for k, v in unwrapped.state_dict().items()}
        else:
            self.bad_evals += 1
        return self.patience is not None and self.bad_evals >= self.patience

    def restore_best(self, model) -> None:
        if self.best_state is not None:
            getattr(model, "module", model).load_state_dict(self.best_state)


def eval_points(total_steps: int, steps_per_epoch: int, eval_every: int | None) -> set[int]:
    every = eval_every or steps_per_epoch
    points = set(range(every, total_steps + 1, every))
    points.add(total_steps)
    return points


def make_loaders(train_split, val_split, tokenizer, train: TrainConfig, accelerator: Accelerator | None = None):
    """(training loader of micro-batches, validation loader, optimizer steps to run, steps after which to validate).

    With an `accelerator`, each process loads its share of every batch (`make_loader`); `train.batch_size` is the
    global batch. Without one, the loaders are whole (for accelerate to prepare, in one process)."""
    micro = train.batch_size // train.grad_accum
    world = accelerator.num_processes if accelerator else 1
    if micro < world:
        raise UserError(f"train.batch_size: {train.batch_size} examples per step in micro-batches of {micro} "
                        f"(grad_accum {train.grad_accum}) cannot give each of {world} processes a share; "
                        f"use a batch_size of at least {world * train.grad_accum}")
    train_loader = make_loader(train_split, tokenizer, micro, seed=train.seed, shuffle=True, accelerator=accelerator)
    val_loader = make_loader(val_split, tokenizer, 64, seed=train.seed, shuffle=False, accelerator=accelerator)
    total_steps = plan_steps(len(train_loader), train.grad_accum, train.epochs, train.max_steps)
    steps_per_epoch = max(1, len(train_loader) // train.grad_accum)
    return train_loader, val_loader, total_steps, eval_points(total_steps, steps_per_epoch, train.eval_every)


def progress(total: int, desc: str, accelerator: Accelerator, initial: int = 0):
    """A step progress bar, in the main process only."""
    return tqdm(total=total, initial=initial, desc=desc, leave=False,
                disable=None if accelerator.is_main_process else True)


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start


class LossNotFinite(UserError, FloatingPointError):
    """The loss went NaN/inf: a too high learning rate or bad data; the run stops (exit 2), its checkpoints kept."""


def check_finite(loss: torch.Tensor, step: int, terms: dict[str, float]) -> None:
    """Stop with a message naming the step and the loss term that went NaN/inf."""
    if not torch.isfinite(loss):
        bad = [k for k, v in terms.items() if not math.isfinite(v)] or ["total"]
        raise LossNotFinite(f"loss is not finite at step {step} (term: {', '.join(bad)}); "
                            "lower train.lr or check the data; the last good checkpoint is kept")


# ------------------------------------------------------------------------------------------- learning models

class FastDropout(torch.nn.Dropout):
    """Dropout whose mask comes from 15-bit random integers instead of torch's CPU `bernoulli_`.

    On a CPU without Intel's MKL fast paths (measured on a 2-core AMD EPYC, torch 2.13) `bernoulli_` costs more
    than a 384 x 384 matmul over the same activations (~11 ms for 64 x 35 x 384 floats): the dropout layers of a
    2-layer MiniLM student took 17% of its training step; 15-bit integers cut a step by ~10%.
    Same semantics: each element is kept with probability 1 - p (p rounded to a multiple of 2^-15, e.g.
    0.1 -> 0.100006) and scaled by 1 / (1 - p) so the expectation is unchanged; the mask draws from torch's
    generator, so seeded runs repeat. Identity in eval mode, like nn.Dropout; the models it sits in save and
    export as before (it has no weights).
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        dropped = round(self.p * 32768)  # of the 15-bit values [0, 32767] each element draws
        # one 63-bit draw gives four 15-bit values: 4x fewer calls to the generator than an int16 tensor's random_
        draws = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device).random_()
        values = draws.view(torch.int16)[: x.numel()].view(x.shape) & 0x7FFF
        return x * ((values >= dropped) * (32768 / (32768 - dropped)))


def use_fast_dropout(model: torch.nn.Module) -> int:
    """Swap `model`'s nn.Dropout layers for FastDropout, in place (for CPU training); how many were swapped.
    The attention-probability dropout inside scaled_dot_product_attention is not a layer and stays torch's."""
    swapped = 0
    for module in model.modules():
        for name, child in module.named_children():
            if type(child) is torch.nn.Dropout:
                setattr(module, name, FastDropout(child.p, child.inplace).train(child.training))
                swapped += 1
    return swapped


@dataclass
class Learner:
    """One model that learns in a phase (engine.Engine), alone or with others (distill/mutual.py, alternating.py):
    its optimiser and schedule, its history and its early stopping. The strategy decides when it steps."""

    model: torch.nn.Module
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: object
    history: History
    stopper: EarlyStopping
    extra: torch.nn.Module | None = None
    """Trained along with `model` but outside DDP (e.g. learned projections): its gradients are averaged here."""
    whole: torch.nn.Module | None = None
    """FSDP: the unsharded model `model` is a sharded copy of; `finish` puts the trained weights back into it."""

    def step(self, step: int, logged: dict[str, float], weights: dict[str, float], accelerator: Accelerator,
             max_grad_norm: float, **extra: float) -> None:
        """Apply the gradients in .grad: check the loss is finite, clip, step optimiser and schedule, log `logged`
        (each term's step mean; with several processes each holds its share, summed here) with their weighted sum as
        "loss"."""
        if accelerator.num_processes > 1:
            logged = sum_over_processes(logged, accelerator)
            if self.extra is not None:
                average_gradients(self.extra, accelerator)
        total = sum(weights[t] * v for t, v in logged.items())
        check_finite(torch.tensor(total), step, logged)
        accelerator.clip_grad_norm_(self.params, max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()
        self.history.log_step(step, {"loss": total, **logged, **extra})

    def finish(self, wall_time_s: float) -> History:
        """Leave the best validation weights in the model (unless the stopper keeps the final ones); close and
        return the history."""
        self.stopper.restore_best(self.model)
        if self.whole is not None:  # (every process: gathering the shards is collective)
            self.whole.load_state_dict(full_state_dict(self.model))
        self.history.wall_time_s = wall_time_s
        self.history.close()
        return self.history


def sum_over_processes(values: dict[str, float], accelerator: Accelerator) -> dict[str, float]:
    keys = sorted(values)
    summed = accelerator.reduce(torch.tensor([values[k] for k in keys], dtype=torch.float64, device=accelerator.device),
                                reduction="sum")
    return {k: float(summed[keys.index(k)]) for k in values}


def average_gradients(module: torch.nn.Module, accelerator: Accelerator) -> None:
    """What DDP does for the model, for a module outside it: every process gets the mean of their gradients."""
    for p in module.parameters():
        if p.grad is not None:
            p.grad.copy_(accelerator.reduce(p.grad, reduction="mean"))


def make_learner(model, name: str, *, lr: float, total_steps: int, train: TrainConfig, accelerator: Accelerator,
                 log_dir: Path | None, patience: int | None = None, extra: torch.nn.Module | None = None,
                 score: Callable[[dict[str, float]], tuple[float, ...]] = accuracy_then_loss,
                 keep_best: bool = True) -> Learner:
    """AdamW at `lr` with `train`'s warmup/decay over `total_steps`, a history called `name` and early stopping
    by `score` with `patience` (None: never stops early); `keep_best`: the best validation weights are left in the
    model at the end (else the final ones). `extra` (e.g. the learned projections of hidden terms) is optimised
    along with `model`. Model and optimiser are prepared by `accelerator`."""
    whole = None
    if train.fsdp and accelerator.num_processes > 1:
        whole, model = model, shard_model(model, accelerator)
    elif train.fsdp:
        log.info("%s: train.fsdp: one process, nothing to shard (launch with torchrun or accelerate)", name)
    if accelerator.device.type == "cpu":  # (CUDA's dropout is a fused kernel, faster than FastDropout's three)
        use_fast_dropout(model)
    named = list(model.named_parameters())  # (sharded: the DTensor parameters that the optimizer steps)
    if extra is not None:
        named += list(extra.named_parameters(prefix="extra"))
        extra.to(accelerator.device)
        if accelerator.num_processes > 1:  # what DDP does for the model: every process starts from the main one's
            for p in extra.parameters():
                p.data.copy_(broadcast(p.data, from_process=0))
    optimizer, scheduler = make_optimizer(named, lr=lr, weight_decay=train.weight_decay, total_steps=total_steps,
                                          warmup_ratio=train.warmup_ratio)
    if whole is None:
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    else:  # already sharded: accelerate would wrap it in DDP as well
        optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
    history = History(name)
    history.open_tensorboard(log_dir, accelerator)
    return Learner(model, [p for _, p in named if p.requires_grad], optimizer, scheduler, history,
                   EarlyStopping(patience, score, keep_best=keep_best), extra, whole)


def shard_model(model: torch.nn.Module, accelerator: Accelerator) -> torch.nn.Module:
    """FSDP2: a copy of `model` sharded over the processes, each transformer block (the classes Hugging Face lists
    in `_no_split_modules`) and then the rest as one torch `fully_shard` unit: every process keeps 1/N of each
    parameter, and of its gradient and AdamW moments; a forward gathers a block's weights just before the block
    runs and frees them after. Gradients are reduce-scattered as means over the processes, as DDP all-reduces
    them, so the step normalisation (terms.step_loss) is unchanged.

    kdistill shards with torch itself: accelerate enables its FSDP plugin on GPUs only (on CPU it falls back to
    DDP), and the same calls then serve gloo (CPU) and NCCL (GPU). `model` itself stays whole, for evaluation and
    saving by the main process; its full copy is all the sharding does not save."""
    sharded = copy.deepcopy(model).to(accelerator.device)
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    if not blocks:
        raise UserError(f"train.fsdp: {type(model).__name__} names no transformer blocks (_no_split_modules) to "
                        "shard")
    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    for module in sharded.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    if accelerator.is_main_process:
        held = sum(p.to_local().numel() for p in sharded.parameters())
        log.info("train.fsdp: student sharded over %d processes: this one holds %d of its %d parameters",
                 accelerator.num_processes, held, sum(p.numel() for p in sharded.parameters()))
    return sharded


def full_state_dict(model: torch.nn.Module) -> dict[str, Tensor]:
    """`model`'s state dict with every sharded tensor (DTensor) gathered whole; every process must call it."""
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in model.state_dict().items()}
