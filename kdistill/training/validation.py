"""Validation metrics of one model: accuracy and macro-F1, entity F1 of a tagger, a sentence encoder's agreement with
its teacher, a causal LM's perplexity; and the scores early stopping ranks them by."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from accelerate import Accelerator
from accelerate.utils import gather_object
from sklearn.metrics import f1_score
from seqeval.metrics import accuracy_score as seqeval_accuracy
from seqeval.metrics import classification_report as seqeval_report
from seqeval.scheme import IOB2

from kdistill import losses
from kdistill.data import UNLABELED, LMBlocks, next_token_targets, target_window
from kdistill.features import Pooling, capture, keeps_logits
from kdistill.training.batching import has_token_labels


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
    keep = blocks.prompt_lengths is not None and keeps_logits(model)
    total, count, nbytes = 0.0, 0, 0
    try:
        for start in range(0, len(blocks), batch_size):
            batch = blocks.batch(slice(start, start + batch_size))
            labels, valid = next_token_targets(batch["input_ids"], batch["attention_mask"],
                                               batch.pop("prompt_length", 0))
            inputs = {k: v.to(device) for k, v in batch.items()}
            if keep:  # logits only where the targets are (an instruction row's response, not its prompt)
                window = target_window(valid)
                labels, valid = labels[:, window], valid[:, window]
                inputs["logits_to_keep"] = torch.arange(window.start, window.stop, device=device)
            logits = model(**inputs).logits.float()
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
