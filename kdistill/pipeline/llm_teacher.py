"""Classification with a prompted LLM as the teacher (teacher.llm): the LLM scores every text once, the student
(student.model, or student.from_scratch) learns its soft labels.

The LLM is an instruction-tuned causal LM, not fine-tuned. Each text goes into teacher.llm.prompt, the user turn of
the LLM's own chat template (kdistill.data.chat: special tokens come from the template alone), after teacher.llm.shots
labeled training rows as earlier (user, assistant) turns; each label's answer (its verbalizer) is scored as the
assistant's reply (cache/label_scores.py), once per text, stored and reused by later runs and seeds. Normalised over
the labels and calibrated (`calibrated`: less the label prior the LLM shows over the training texts), the scores are
the teacher's logits: the `kd` term reads them on every training row (transfer rows
included), `ce` the gold labels of the labeled rows. The no-KD baseline is the same student on the gold labels
alone. metrics.json "llm_teacher" holds the LLM's own test accuracy and macro-F1 (the argmax of its scores) and
its cost per 1,000 texts beside the student's, measured alike (CPU seconds of a batched pass; the student's, the
median of 3 passes). Behind teacher.llm.endpoint the LLM's CPU is the server's, not seen here: its cost is the
pass's wall seconds and requests.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path

import torch

from kdistill.augment import with_transfer
from kdistill.cache.label_scores import llm_label_scores
from kdistill.config import RunConfig
from kdistill.data import UNLABELED, DataBundle, Encodings, pad_id_of
from kdistill.data.chat import ChatExample, encode_chat, text_ids, with_shots
from kdistill.errors import UserError
from kdistill.measure import predict, quality_metrics
from kdistill.models import load_model_dir, load_tokenizer, save_model
from kdistill.pipeline.common import is_saved, phase_checkpoints, save_history
from kdistill.pipeline.encoder import (
    check_trim_vocab,
    evaluate_run,
    finish_run,
    train_baseline,
    trimmed_student,
)
from kdistill.pipeline.students import student_classifier
from kdistill.strategies.explicit import distill_explicit
from kdistill.strategies.phase import Phase
from kdistill.task import get_task
from kdistill.teacher import load_frozen_lm, scratch_classifier
from kdistill.teacher_endpoint import endpoint_label_scores
from kdistill.terms import TermSpec
from kdistill.training import is_main_process

log = logging.getLogger(__name__)

SCORED_SPLITS = ("train", "validation", "test")
"""The splits the LLM scores, in this order, in one pass: the student learns the first, the report reads the rest."""


def verbalizers(cfg: RunConfig, label_names: list[str]) -> list[str]:
    """Each label's answer, in label order: teacher.llm.verbalizers', else the label's name."""
    given = cfg.teacher.llm.verbalizers or {}
    unknown = sorted(set(given) - set(label_names))
    if unknown:
        raise UserError(f"teacher.llm.verbalizers: {unknown[0]!r} is not a label of the data "
                        f"({', '.join(label_names)})")
    missing = [n for n in label_names if n not in given]
    if given and missing:
        raise UserError(f"teacher.llm.verbalizers: no answer for label {missing[0]!r}; give one for every label "
                        f"({', '.join(label_names)}) or none")
    return [given.get(n, n) for n in label_names]


def llm_inputs(cfg: RunConfig, tokenizer, texts: list[str], shots: list[tuple[str, int]],
               answers: list[str]) -> tuple[list[list[int]], list[list[int]]]:
    """(each text's prompt ids: its user turn after the shots, through the chat template and its generation prompt;
    each label's answer ids, as a reply's content is tokenised). A text longer than data.max_length of the LLM's
    tokens is cut to them, so that the prompt's instructions are never what is lost."""
    llm = cfg.teacher.llm
    labels_line = ", ".join(answers)

    def turn(text: str) -> tuple[dict]:
        ids = text_ids(tokenizer, text)
        if len(ids) > cfg.data.max_length:
            text = tokenizer.decode(ids[: cfg.data.max_length])
        return ({"role": "user", "content": llm.prompt.format(text=text, labels=labels_line)},)

    shown = [ChatExample(turn(text), answers[label], {}, f"teacher.llm.shots[{i}]")
             for i, (text, label) in enumerate(shots)]
    examples = with_shots([ChatExample(turn(t), None, {}, f"text {i}") for i, t in enumerate(texts)], shown)
    # no cut here: each text is cut above, and the shots and the template are the recipe's own
    prompts = [encode_chat(tokenizer, e, max_prompt_tokens=2**31 - 1, max_response_tokens=1).prompt_ids
               for e in examples]
    answer_ids = [text_ids(tokenizer, a) for a in answers]
    same = {tuple(a) for a in answer_ids}
    if len(same) < len(answer_ids):
        raise UserError("teacher.llm.verbalizers: two labels' answers are the same tokens for the LLM's tokenizer; "
                        "give each label a distinct answer")
    return prompts, answer_ids


def llm_signal(cfg: RunConfig, data: DataBundle) -> tuple[dict[str, torch.Tensor], dict]:
    """The LLM's label scores, raw log-probabilities (N, C), of every row of each of SCORED_SPLITS (`data`: the
    student's, transfer rows included), and the scoring pass's info (cache/label_scores.py). The LLM is loaded for
    this pass alone; behind teacher.llm.endpoint, only its tokenizer is."""
    name = cfg.teacher.llm.model
    endpoint = cfg.teacher.llm.endpoint
    if endpoint is None:
        llm, tokenizer, _ = load_frozen_lm(name, "teacher.llm.model")
    else:
        llm, tokenizer = None, load_tokenizer(name)
    answers = verbalizers(cfg, data.label_names)
    train = data.splits["train"]
    labeled = [(t, y) for t, y in zip(train["text"], train["label"]) if y != UNLABELED]
    if len(labeled) < cfg.teacher.llm.shots:
        raise UserError(f"teacher.llm.shots: {cfg.teacher.llm.shots} shots, but the training split holds "
                        f"{len(labeled)} labeled rows")
    texts = [t for split in SCORED_SPLITS for t in data.splits[split]["text"]]
    prompts, answer_ids = llm_inputs(cfg, tokenizer, texts, labeled[: cfg.teacher.llm.shots], answers)
    log.info("teacher.llm %s: %d texts, %d labels (answers %s), prompts of %d-%d tokens", name, len(texts),
             len(answers), answers, min(map(len, prompts)), max(map(len, prompts)))
    if endpoint is None:
        scores, info = llm_label_scores(llm, prompts, answer_ids, pad_id=pad_id_of(tokenizer),
                                        batch_size=cfg.teacher.llm.batch_size)
    else:
        scores, info = endpoint_label_scores(endpoint, prompts, answer_ids)
    out, start = {}, 0
    for split in SCORED_SPLITS:
        n = len(data.splits[split])
        out[split], start = scores[start: start + n], start + n
    info.update(model=name, answers=answers, answer_tokens=[len(a) for a in answer_ids], shots=cfg.teacher.llm.shots,
                params=sum(p.numel() for p in llm.parameters()) if llm is not None else None,
                endpoint=endpoint.url if endpoint is not None else None)
    return out, info


def calibrated(scores: dict[str, torch.Tensor], how: str) -> tuple[dict[str, torch.Tensor], list[float] | None]:
    """Each split's label log-probabilities, normalised over the labels (log-softmax), and with `how` "batch" less
    the label prior: log q(c | x) = log p(c | x) − mean over the training texts x' of log p(c | x') (Batch
    Calibration, Zhou et al., ICLR 2024, in log space), estimated on the training split alone, so no held-out text
    informs it. Returns (scores (N, C) per split, the prior (C,) or None)."""
    normalised = {split: s.log_softmax(-1) for split, s in scores.items()}
    if how == "none":
        return normalised, None
    prior = normalised["train"].mean(0)  # (C,)
    return {split: s - prior for split, s in normalised.items()}, prior.tolist()


def cost_per_1000(model, encoded, tokenizer, batch_size: int, repeats: int = 3) -> dict:
    """CPU and wall seconds per 1,000 texts of `model`'s batched pass over `encoded`, measured as the LLM's scoring
    pass is (process CPU time), each the median of `repeats` passes: one pass of a small model lasts seconds and
    reads whatever else the machine did then (the LLM's one pass lasts minutes)."""
    cpu, wall = [], []
    for _ in range(repeats):
        cpu0, wall0 = time.process_time(), time.perf_counter()
        predict(model, encoded, tokenizer, batch_size=batch_size)
        cpu.append(time.process_time() - cpu0)
        wall.append(time.perf_counter() - wall0)
    n = max(len(encoded), 1)
    return {"cpu_s_per_1000_texts": 1000 * statistics.median(cpu) / n,
            "wall_s_per_1000_texts": 1000 * statistics.median(wall) / n}


def llm_metrics(cfg: RunConfig, data: DataBundle, scores: dict[str, torch.Tensor], info: dict, student_dir: Path,
                encodings: Encodings, raw: dict[str, torch.Tensor], prior: list[float] | None) -> dict:
    """metrics.json "llm_teacher": the LLM's test (and validation) quality from the argmax of its (calibrated)
    scores, the raw scores' test accuracy beside it, and its cost per 1,000 texts beside the student's and their
    ratio."""
    test = quality_metrics(scores["test"].argmax(-1).tolist(), list(data.splits["test"]["label"]), data.label_names)
    raw_accuracy = quality_metrics(raw["test"].argmax(-1).tolist(), list(data.splits["test"]["label"]),
                                   data.label_names)["accuracy"]
    validation = quality_metrics(scores["validation"].argmax(-1).tolist(), list(data.splits["validation"]["label"]),
                                 data.label_names)
    student, tokenizer, _ = load_model_dir(student_dir)
    student_cost = cost_per_1000(student, encodings(data, tokenizer, ("test",))["test"], tokenizer,
                                 cfg.teacher.llm.batch_size)
    return {
        "model": info["model"], "prompt": cfg.teacher.llm.prompt, "verbalizers": dict(zip(data.label_names,
                                                                                           info["answers"])),
        "answer_tokens": info["answer_tokens"], "shots": info["shots"], "params": info["params"],
        "accuracy": test["accuracy"], "macro_f1": test["macro_f1"], "n_test": test["n_test"],
        "confusion_matrix": test["confusion_matrix"], "validation_accuracy": validation["accuracy"],
        "calibration": cfg.teacher.llm.calibration, "raw_accuracy": raw_accuracy,
        "label_prior": dict(zip(data.label_names, prior)) if prior is not None else None,
        "texts_scored": info["texts"], "calls": info["calls"], "reused": info["reused"],
        "forwards_per_text": info["forwards_per_text"], "store": info["path"],
        "cpu_s_per_1000_texts": info["cpu_s_per_1000_texts"], "wall_s_per_1000_texts": info["wall_s_per_1000_texts"],
        "student_cpu_s_per_1000_texts": student_cost["cpu_s_per_1000_texts"],
        "student_wall_s_per_1000_texts": student_cost["wall_s_per_1000_texts"],
        "cpu_cost_ratio": info["cpu_s_per_1000_texts"] / student_cost["cpu_s_per_1000_texts"]
        if info["cpu_s_per_1000_texts"] is not None and student_cost["cpu_s_per_1000_texts"] else None,
        "wall_cost_ratio": info["wall_s_per_1000_texts"] / student_cost["wall_s_per_1000_texts"]
        if student_cost["wall_s_per_1000_texts"] else None,
        "endpoint": info["endpoint"], "requests": info.get("requests"),
        "batch_size": cfg.teacher.llm.batch_size, "threads": torch.get_num_threads(),
    }


def llm_student(cfg: RunConfig, data: DataBundle):
    """(the student, in training mode, and its tokenizer): student.model with a head for the labels, or
    student.from_scratch's BERT from random weights over a tokenizer built from `data`'s training texts (transfer
    texts included: the student reads them too)."""
    scratch = cfg.student.from_scratch
    if scratch is None:
        return student_classifier(cfg, data.label_names).train(), load_tokenizer(cfg.student.model)
    student, tokenizer = scratch_classifier(scratch, cfg, data.label_names, list(data.splits["train"]["text"]),
                                            "student.from_scratch.tokenizer")
    log.info("student: from scratch, %d layers x %d wide, vocabulary of %d (%s)", scratch.num_hidden_layers,
             scratch.hidden_size, len(tokenizer), scratch.tokenizer)
    return student.train(), tokenizer


def run_llm_phases(cfg: RunConfig, data: DataBundle, run_dir: Path, *, resume: bool, started: float,
                   fingerprint: dict) -> Path:
    """The LLM's scores (stored once), the student learning them, the no-KD baseline; then evaluation, export and
    the report (main process). Every process reads the same scores: those the store holds, the others scored.
    """
    main = is_main_process()
    encodings = Encodings(cfg.data.max_length, cfg.data.label_all_subtokens)
    student_data = with_transfer(data, cfg.data, None, None)  # data.unlabeled_file's rows (no augment: config)
    raw, info = llm_signal(cfg, student_data)
    scores, prior = calibrated(raw, cfg.teacher.llm.calibration)

    student, student_tokenizer = llm_student(cfg, student_data)
    check_trim_vocab(cfg, student_tokenizer)
    baseline_init = {k: v.clone() for k, v in student.state_dict().items()} if cfg.distill.baseline else None

    models = {"student": (run_dir / "student", None)}
    if resume and is_saved(run_dir / "student"):
        log.info("student: distilled before the run was resumed (%s)", run_dir / "student")
    else:
        checkpoints = phase_checkpoints(cfg, run_dir, "student", resume, fingerprint)
        phase = Phase(student, [], student_tokenizer, encodings(student_data, student_tokenizer),
                      TermSpec.of_recipe(cfg.distill.losses, [], cfg.distill), cfg.distill, cfg.train,
                      get_task(cfg.task), log_dir=run_dir / "logs", checkpoints=checkpoints)
        # normalised over the labels (and calibrated): the LLM's distribution over the answers, read by kd as logits
        history = distill_explicit(phase, work_dir=run_dir, teacher_logits=scores["train"])
        models["student"] = (run_dir / "student", history)
        if main:
            save_history(run_dir, history)
            saved, saved_tokenizer, trimmed = trimmed_student(cfg, student, student_tokenizer, student_data)
            save_model(saved, saved_tokenizer, run_dir / "student",
                       {"role": "student", "task": cfg.task, "max_length": cfg.data.max_length,
                        "strategy": cfg.distill.strategy, "losses": cfg.distill.losses,
                        "teacher": f"llm {info['model']}", "train_wall_time_s": history.wall_time_s, **trimmed})
            checkpoints.clear()
    if baseline_init is not None:
        models["baseline"] = train_baseline(cfg, run_dir, student, baseline_init, student_tokenizer,
                                            encodings(data, student_tokenizer), resume=resume, fingerprint=fingerprint)

    if not main:
        return run_dir
    metrics = evaluate_run(cfg, run_dir, models, student_data, None, encodings)
    metrics["llm_teacher"] = llm = llm_metrics(cfg, data, scores, info, run_dir / "student", encodings, raw, prior)
    for r in metrics["models"].values():  # against the LLM: there is no teacher model to time or size here
        r["accuracy_retained_pct"] = 100 * r["accuracy"] / llm["accuracy"] if llm["accuracy"] else None
        r.pop("speedup_vs_teacher", None)
        r.pop("size_ratio_vs_teacher", None)
    metrics["units"].update(cpu_s_per_1000_texts="CPU s per 1,000 texts", wall_s_per_1000_texts="s per 1,000 texts")
    return finish_run(cfg, run_dir, data, metrics, started)
