"""Task `classification`: a text (or a text pair) in, one of N classes out.

Data: texts with a class label (data.load_data: built-in datasets or CSV/TSV/JSONL/Parquet files, optional
unlabeled transfer texts and augmentation). Models: a sequence classifier (AutoModelForSequenceClassification);
a teacher from scratch is a BERT with a classification head. Terms: soft targets (kd, counted per example),
labels (ce), [CLS] states, attention and Q/K/V relations, hidden states. Score: accuracy, then macro-F1.
Pipeline: the encoder pipeline (teacher, student, no-KD baseline; pipeline/encoder.py); with teacher.llm the teacher
is a prompted causal LM whose verbalizer scores the student learns (pipeline/llm_teacher.py).
"""

from __future__ import annotations

from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

from kdistill.data import load_data
from kdistill.deploy.predict import Predictor
from kdistill.errors import UserError
from kdistill.models import load_tokenizer
from kdistill.pipeline.encoder import run_encoder
from kdistill.pipeline.llm_teacher import run_llm_phases
from kdistill.teacher_endpoint import api_key
from kdistill.pipeline.preflight import recipe_teacher_tokenizer
from kdistill.pipeline.students import check_tokenizers, student_classifier
from kdistill.pipeline.verbs import evaluate_classifier_dir
from kdistill.reporting import COLUMNS, write_classifier_report
from kdistill.task import Task


def labeled_student_model(cfg, teacher):
    """student.model with a classification head for the teacher's labels."""
    return student_classifier(cfg, [teacher.config.id2label[i] for i in range(teacher.config.num_labels)])


def check_student_tokenizer(cfg, *, distilling: bool) -> None:
    """A student.model with another vocabulary than the teacher's: only with terms that can cross it."""
    if distilling and cfg.student.model:
        teacher_tokenizer = recipe_teacher_tokenizer(cfg)
        if teacher_tokenizer is not None:  # else run_phases checks, once the teacher's WordPiece is trained
            check_tokenizers(cfg, teacher_tokenizer, load_tokenizer(cfg.student.model))


def with_model_labels(model_dir, info, data_cfg, spec):
    """The data, its label ids renumbered to the model's (the same names, in the model's order)."""
    names = info.labels
    data = load_data(data_cfg)
    if sorted(names) != sorted(data.label_names):
        raise UserError(f"{model_dir}: model labels {names} differ from the data's {data.label_names} ({spec})")
    if names != data.label_names:  # same names, other order: renumber the data to the model's ids
        remap = {i: names.index(n) for i, n in enumerate(data.label_names)}
        data.splits = data.splits.map(lambda r: {"label": remap.get(r["label"], r["label"])})  # UNLABELED stays
        data.label_names = names
    return data


def run_classification(cfg, out=None, *, resume: bool = False, overwrite: bool = False):
    """The encoder pipeline; with teacher.llm, its phases with a prompted LLM as the teacher."""
    return run_encoder(cfg, out, resume=resume, overwrite=overwrite,
                       phases=run_llm_phases if cfg.teacher.llm else None)


def check_recipe(cfg, *, distilling: bool) -> None:
    if cfg.teacher.llm is not None and cfg.teacher.llm.endpoint is not None:
        api_key(cfg.teacher.llm.endpoint, "teacher.llm.endpoint")  # its variable is set, before any data is read


def texts_and_labels(data):
    """Export parity: the test texts and their gold labels."""
    return list(data.splits["test"]["text"]), list(data.splits["test"]["label"])


def predictor(info, tokenizer, runner, max_length):
    return Predictor(tokenizer=tokenizer, runner=runner, labels=info.labels, max_length=max_length, info=info)


TASK = Task(
    name="classification",
    summary="A text (or text pair) in, one of N classes out; scored by accuracy and macro-F1.",
    term_units={"logits": "rows", "labels": None, "cls": None, "attention": None, "hidden": "tokens"},
    headline=("accuracy", "macro_f1"),
    run=run_classification,
    load_data=load_data,
    auto_model=AutoModelForSequenceClassification,
    scratch_model=BertForSequenceClassification,
    features=frozenset({"two_stage", "prune_student_model", "trim_vocab", "llm_teacher"}),
    preflight=check_recipe,
    preflight_files=check_student_tokenizer,
    student_model=labeled_student_model,
    data_for_model=with_model_labels,
    evaluate_dir=evaluate_classifier_dir,
    parity_data=texts_and_labels,
    predictor=predictor,
    report_columns=COLUMNS,
    report=write_classifier_report,
)
