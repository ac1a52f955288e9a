"""The parts the step engine (engine.py) is built from: processes and seeds, loaders and length-grouped samplers, the
stream of a step's micro-batches (GroupStream), the units a term counts in a batch (batch_units, step_units),
optimiser and schedule, a learning model (Learner: its optimiser, history, early stopping), validation metrics;
one module each: processes.py, batching.py, learner.py, validation.py.

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

from kdistill.training.processes import (
    set_seed,
    make_accelerator,
    process_state,
    is_main_process,
    world_size,
    sum_over_processes,
    average_gradients,
    shard_model,
    full_state_dict,
)
from kdistill.training.batching import (
    LengthGroupedSampler,
    make_loader,
    has_token_labels,
    set_loader_epoch,
    GroupStream,
    batch_units,
    step_units,
    plan_steps,
    eval_points,
    make_loaders,
)
from kdistill.training.validation import (
    predict_logits,
    validation_metrics,
    accuracy_then_loss,
    tag_sequences,
    entity_metrics,
    token_validation_metrics,
    embedding_validation_metrics,
    cosine_then_mse,
    perplexity,
)
from kdistill.training.learner import (
    make_optimizer,
    History,
    EarlyStopping,
    progress,
    Timer,
    LossNotFinite,
    check_finite,
    FastDropout,
    use_fast_dropout,
    Learner,
    make_learner,
)

__all__ = [
    "EarlyStopping", "FastDropout", "GroupStream", "History", "Learner", "LengthGroupedSampler", "LossNotFinite",
    "Timer", "accuracy_then_loss", "average_gradients", "batch_units", "check_finite", "cosine_then_mse",
    "embedding_validation_metrics", "entity_metrics", "eval_points", "full_state_dict", "has_token_labels",
    "is_main_process", "make_accelerator", "make_learner", "make_loader", "make_loaders", "make_optimizer",
    "perplexity", "plan_steps", "predict_logits", "process_state", "progress", "set_loader_epoch", "set_seed",
    "shard_model", "step_units", "sum_over_processes", "tag_sequences", "token_validation_metrics",
    "use_fast_dropout", "validation_metrics", "world_size",
]
