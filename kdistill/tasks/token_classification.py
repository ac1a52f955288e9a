"""Task `token-classification` (NER, slot filling): a sentence in, a tag per word out (IOB2).

Data: sentences with a tag per word (data.load_token_data: built-in CoNLL-2003 / People's Daily, or CoNLL and
JSONL files; optional unlabeled transfer sentences). Models: a token classifier
(AutoModelForTokenClassification); a teacher from scratch is a BERT with a token-classification head. Terms:
per-token soft targets (kd, counted per scored token), labels (ce), attention, hidden states. Score: entity F1
(seqeval, strict IOB2), per type in the report. Pipeline: the encoder pipeline (pipeline/encoder.py).
"""

from __future__ import annotations

from transformers import AutoModelForTokenClassification, BertForTokenClassification

from kdistill.data import join_words, load_token_data
from kdistill.deploy.predict import TokenPredictor
from kdistill.errors import UserError
from kdistill.models import load_model_dir
from kdistill.pipeline.encoder import run_encoder
from kdistill.pipeline.verbs import evaluate_classifier_dir
from kdistill.reporting import TOKEN_COLUMNS, entity_sections, write_classifier_report
from kdistill.task import Task

NAME = "token-classification"


def check_config(cfg) -> None:
    if cfg.data.augment:
        raise ValueError(f"data.augment works with task classification only (it rewrites whole texts); {NAME} "
                         "takes data.unlabeled_file")
    if cfg.data.unlabeled_file and cfg.distill.strategy != "explicit":
        # the soft tags of the transfer sentences come from a frozen teacher, which only explicit has
        raise ValueError(f"data.unlabeled_file: {NAME} learns transfer sentences with strategy explicit (a frozen "
                         f"teacher), not {cfg.distill.strategy}")


def claims(config: dict, _path) -> bool:
    return any(a.endswith("ForTokenClassification") for a in config.get("architectures") or [])


def whole_student_model(cfg, _teacher):
    return load_model_dir(cfg.student.model)[0]


def with_model_tags(model_dir, info, data_cfg, spec):
    """The sentences, their tag ids renumbered to the model's (its id2label); UserError when the tag sets differ."""
    names, data = info.labels, load_token_data(data_cfg)
    if sorted(names) != sorted(data.label_names):
        raise UserError(f"{model_dir}: model tags {names} differ from the data's {data.label_names} ({spec})")
    if names != data.label_names:
        remap = [names.index(n) for n in data.label_names]
        remap += range(len(names), len(names) + len(data.test_only_tags))  # test-only tags keep their ids
        data.splits = data.splits.map(lambda r: {"tags": [remap[t] for t in r["tags"]]})
        data.label_names = names
    return data


def sentence_texts(split, limit: int = 256) -> list[str]:
    """Plain texts of (the first `limit`) sentences of a token split, its words joined by spaces (without spaces
    between CJK characters, as written): what predict and serve read."""
    return [join_words(words) for words in split["tokens"][:limit]]


def sentences(data):
    """Export parity: the test sentences' text (no labels: the logits are compared, a row per token)."""
    return sentence_texts(data.splits["test"]), None


def predictor(info, tokenizer, runner, max_length):
    return TokenPredictor(tokenizer=tokenizer, runner=runner, labels=info.labels, max_length=max_length, info=info)


def report(runs, out):
    return write_classifier_report(runs, out, sections=entity_sections)


TASK = Task(
    name=NAME,
    summary="A sentence in, a tag per word out (NER, slot filling); scored by entity F1 (seqeval, strict IOB2).",
    term_units={"logits": "scored", "labels": None, "attention": None, "hidden": "tokens"},
    headline=("entity_f1", "entity_precision", "entity_recall", "token_accuracy"),
    run=run_encoder,
    load_data=load_token_data,
    auto_model=AutoModelForTokenClassification,
    scratch_model=BertForTokenClassification,
    features=frozenset({"two_stage", "trim_vocab"}),
    check_config=check_config,
    claims=claims,
    student_model=whole_student_model,
    data_for_model=with_model_tags,
    evaluate_dir=evaluate_classifier_dir,
    parity_data=sentences,
    predictor=predictor,
    report_columns=TOKEN_COLUMNS,
    report=report,
)
