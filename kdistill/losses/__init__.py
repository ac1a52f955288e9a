"""Distillation losses as pure tensor functions, one module per family.

Every loss returns ``(total, count)``:

* ``total``: a 0-dim, differentiable tensor, the SUM of the per-item losses over the counted items;
* ``count``: a 0-dim int64 tensor, the number of counted items (each docstring says what an item is).

Nothing here averages. The caller divides ``Σ total / Σ count`` over every micro-batch and process, so that
gradient accumulation and data parallelism give the same loss as one big batch. When nothing is counted
(``count == 0``) ``total`` is 0; clamp the count to at least 1 before dividing.

Masks are ``True``/1 where an item counts (a Hugging Face ``attention_mask`` works as is). Masked items are
excluded with ``torch.where``, never by multiplying, because a padded item may hold inf/NaN and 0·inf = NaN.

Every KL computed on temperature-softened logits is multiplied by T², as in Hinton et al. (2015): softening
scales the gradients by 1/T², and T² keeps the term's magnitude comparable across temperatures.

The families:
  logits           sequence-level soft targets (Hinton KD), several teachers, cross-entropy with the labels
  intermediate     hidden states, attention maps, attention relations, [CLS] vectors (encoders)
  tokens           token-level divergences of causal LMs, the cached top-k teacher, next-token cross-entropy
  cross_tokenizer  teacher and student over different vocabularies (ULD, aligned KD)
  embeddings       pooled sentence embeddings
  schedule         the temperature schedule
  shared           what the families share: the (sum, count) reduction, KL, softened log-probabilities, checks
"""

from kdistill.losses.cross_tokenizer import aligned_kd_loss, uld_loss
from kdistill.losses.embeddings import pooled_contrastive, pooled_cosine, pooled_mse
from kdistill.losses.intermediate import (
    attention_kl,
    attention_mse,
    cls_pkd,
    hidden_cosine,
    hidden_mse,
    minilm_relation_kl,
)
from kdistill.losses.logits import average_teacher_logprobs, hard_ce, soft_kl
from kdistill.losses.schedule import temperature_at
from kdistill.losses.shared import Projection
from kdistill.losses.tokens import (
    forward_kl_tokens,
    generalized_jsd_tokens,
    lm_ce_tokens,
    reverse_kl_tokens,
    skew_kl_tokens,
    skew_reverse_kl_tokens,
    topk_forward_kl_tokens,
)

__all__ = [
    "soft_kl",
    "average_teacher_logprobs",
    "hard_ce",
    "hidden_mse",
    "hidden_cosine",
    "attention_kl",
    "attention_mse",
    "minilm_relation_kl",
    "cls_pkd",
    "forward_kl_tokens",
    "reverse_kl_tokens",
    "generalized_jsd_tokens",
    "skew_kl_tokens",
    "skew_reverse_kl_tokens",
    "topk_forward_kl_tokens",
    "lm_ce_tokens",
    "uld_loss",
    "aligned_kd_loss",
    "temperature_at",
    "pooled_mse",
    "pooled_cosine",
    "pooled_contrastive",
    "Projection",
]
