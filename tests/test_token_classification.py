"""task: token-classification (NER), end to end: readers, People's Daily BIO, sub-word alignment, token-level terms
normalised over the labeled tokens of a whole step, seqeval metrics, a tiny run, predict / serve spans, ONNX parity.
"""

from __future__ import annotations

import json
import random
import re
import socket
import threading
import time
import urllib.request

import pytest
import torch
from datasets import Dataset
from transformers import BertForTokenClassification

from kdistill.config import DataConfig, TrainConfig, load_config
from kdistill.data import (
    UNLABELED,
    align_tags,
    continuation_ids,
    encode_token_split,
    join_words,
    load_token_data,
    peoples_daily_sentence,
    read_conll,
    read_token_jsonl,
    to_iob2,
)
from kdistill.deploy.export import export_model
from kdistill.deploy.predict import entity_spans, load_predictor
from kdistill.engine import backward_group
from kdistill.errors import DataError
from kdistill.features import capture
from kdistill.models import save_model
from kdistill.terms import TermSpec, compute_terms
from kdistill.training import entity_metrics, make_accelerator, make_loader
from tests.conftest import KEYWORDS, FILLER, tiny_bert_config

TAGS = ["B-POL", "B-SPO", "B-TEC", "I-SPO", "O"]  # sorted, as load_token_data orders them
TYPE = {"sport": "SPO", "tech": "TEC", "politics": "POL"}


def toy_sentences(n: int, seed: int = 0) -> list[dict]:
    """Sentences of filler words with keyword entities (a keyword is B-<its class>; "team coach" is one SPO entity
    of two words) and sub-word splits ("goals" -> goal ##s)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        tokens, tags = [], []
        for _ in range(rng.randint(3, 6)):
            r = rng.random()
            if r < 0.3:
                cls = rng.choice(list(KEYWORDS))
                word = rng.choice(KEYWORDS[cls])
                tokens.append(word + ("s" if rng.random() < 0.3 else ""))
                tags.append("B-" + TYPE[cls])
            elif r < 0.4:
                tokens += ["team", "coach"]
                tags += ["B-SPO", "I-SPO"]
            else:
                tokens.append(rng.choice(FILLER))
                tags.append("O")
        out.append({"tokens": tokens, "tags": tags})
    return out


def write_conll(path, sentences, columns: int = 2):
    lines = ["-DOCSTART- -X- -X- O", ""]
    for s in sentences:
        for tok, tag in zip(s["tokens"], s["tags"]):
            lines.append(" ".join([tok] + ["X"] * (columns - 2) + [tag]))
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------- readers

def test_conll_reader_skips_docstart_splits_at_blank_lines_and_takes_the_last_column(tmp_path):
    f = tmp_path / "a.conll"
    f.write_text("-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\n\nPeter NNP B-NP B-PER\n"
                 "Blackburn NNP I-NP I-PER\n", encoding="utf-8")
    assert read_conll(f) == [{"tokens": ["EU", "rejects"], "tags": ["B-ORG", "O"]},
                             {"tokens": ["Peter", "Blackburn"], "tags": ["B-PER", "I-PER"]}]


def test_iob1_is_converted_to_iob2():
    assert to_iob2(["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-ORG"]) == \
        ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "B-ORG"]
    assert to_iob2(["B-PER", "I-PER"]) == ["B-PER", "I-PER"]


@pytest.mark.parametrize("text, message", [
    ("EU B-ORG\nrejects\n", "line 2: one column ('rejects')"),
    ("EU B-ORG\nrejects X-Y\n", "line 2: tag 'X-Y' is not BIO"),
    ("\n\n", "no sentences"),
])
def test_conll_reader_names_file_and_line_of_bad_input(tmp_path, text, message):
    f = tmp_path / "bad.conll"
    f.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(message)) as e:
        read_conll(f)
    assert str(f) in str(e.value) and "\n" not in str(e.value)


def test_jsonl_reader_and_its_errors(tmp_path):
    f = tmp_path / "a.jsonl"
    f.write_text('{"tokens": ["EU", "rejects"], "tags": ["B-ORG", "O"]}\n\n{"tokens": ["x"], "tags": ["I-PER"]}\n',
                 encoding="utf-8")
    assert read_token_jsonl(f) == [{"tokens": ["EU", "rejects"], "tags": ["B-ORG", "O"]},
                                   {"tokens": ["x"], "tags": ["B-PER"]}]
    for line, message in (('{"tokens": ["a", "b"], "tags": ["O"]}', "line 1: 2 tokens but 1 tags"),
                          ('{"tokens": "a b", "tags": ["O"]}', "line 1: 'tokens' must be a non-empty list"),
                          ('{"tokens": ["a"], "tags": [', "line 1: invalid JSON")):
        f.write_text(line + "\n", encoding="utf-8")
        with pytest.raises(DataError, match=re.escape(message)):
            read_token_jsonl(f)


def test_bad_token_file_exits_2_with_one_line(tmp_path, tiny_tokenizer):
    from tests.helpers import finish, start_kdistill, write_recipe
    bad = tmp_path / "bad.conll"
    bad.write_text("EU B-ORG\nrejects\n", encoding="utf-8")
    recipe = write_recipe(tmp_path / "r.yaml", {"task": "token-classification", "data": {"train_file": str(bad)}})
    done = finish(start_kdistill("run", recipe, "--out", tmp_path / "run"))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == f"kdistill: {bad}: line 2: one column ('rejects'); expected a " \
        "token and its tag separated by whitespace (a blank line between sentences)"


# ---------------------------------------------------------------------------------------- People's Daily

def test_peoples_daily_lines_become_character_bio():
    chars, tags = peoples_daily_sentence("中共中央/nt  总书记/n  江/nr  泽民/nr  在/p  北京/ns  上海/ns  。/w")
    assert "".join(chars) == "中共中央总书记江泽民在北京上海。"
    assert tags == ["B-ORG", "I-ORG", "I-ORG", "I-ORG", "O", "O", "O", "B-PER", "I-PER", "I-PER", "O",
                    "B-LOC", "I-LOC", "B-LOC", "I-LOC", "O"]  # surname + given name: one person; two places


def test_peoples_daily_bracketed_compound_is_one_entity_of_the_brackets_tag():
    chars, tags = peoples_daily_sentence("[中国/ns  政府/n]nt  发言人/n")
    assert "".join(chars) == "中国政府发言人"
    assert tags == ["B-ORG", "I-ORG", "I-ORG", "I-ORG", "O", "O", "O"]


def test_join_words_keeps_chinese_unspaced():
    assert join_words(["中", "国", "is", "big", "。"]) == "中国 is big 。"


# ------------------------------------------------------------------------------------------- alignment

def test_first_subtoken_alignment_and_all_subtokens(tiny_tokenizer):
    split = Dataset.from_dict({"tokens": [["goals", "team", "coach"]], "tags": [[1, 1, 3]]})  # B-SPO B-SPO I-SPO
    first = encode_token_split(split, tiny_tokenizer, 16)[0]
    pieces = tiny_tokenizer.convert_ids_to_tokens(first["input_ids"])
    assert pieces == ["[CLS]", "goal", "##s", "team", "coach", "[SEP]"]
    assert first["labels"] == [UNLABELED, 1, UNLABELED, 1, 3, UNLABELED]
    every = encode_token_split(split, tiny_tokenizer, 16, label_all_subtokens=True, label_names=TAGS)[0]
    assert every["labels"] == [UNLABELED, 1, 3, 1, 3, UNLABELED]  # goal B-SPO, ##s I-SPO
    assert continuation_ids(TAGS) == [0, 3, 2, 3, 4]  # B-POL, B-TEC have no I- tag: unchanged


def test_chinese_characters_align_one_to_one(tmp_path):
    from kdistill.tokenization import tokenizer_from_vocab
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "中", "国", "北", "京"]),
                     encoding="utf-8")
    tok = tokenizer_from_vocab(vocab)
    split = Dataset.from_dict({"tokens": [["中", "国", "在", "北", "京"]], "tags": [[0, 1, 2, 0, 1]]})
    enc = encode_token_split(split, tok, 16)[0]
    assert enc["labels"] == [UNLABELED, 0, 1, 2, 0, 1, UNLABELED]  # [UNK] for 在 keeps its tag


def test_align_tags_round_trip_recovers_word_tags():
    word_ids = [None, 0, 0, 1, 2, 2, 2, None]
    labels = align_tags(word_ids, [5, 6, 7])
    assert [y for y in labels if y != UNLABELED] == [5, 6, 7]


# ------------------------------------------------------------------------------------ terms, normalisation

def _token_batch(tokenizer, sentences):
    split = Dataset.from_dict({"tokens": [s["tokens"] for s in sentences],
                               "tags": [[TAGS.index(t) for t in s["tags"]] for s in sentences]})
    loader = make_loader(encode_token_split(split, tokenizer, 32), tokenizer, len(sentences), seed=0, shuffle=False)
    return next(iter(loader))


def tiny_token_model(tokenizer, layers: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    return BertForTokenClassification(tiny_bert_config(tokenizer, num_hidden_layers=layers, num_labels=len(TAGS),
                                                       id2label=dict(enumerate(TAGS)),
                                                       label2id={t: i for i, t in enumerate(TAGS)}))


def test_collator_pads_labels_with_minus_100(tiny_tokenizer):
    batch = _token_batch(tiny_tokenizer, toy_sentences(4))
    assert batch["labels"].shape == batch["input_ids"].shape
    assert (batch["labels"][batch["attention_mask"] == 0] == UNLABELED).all()


def test_token_kd_is_zero_for_equal_logits_and_counts_labeled_tokens(tiny_tokenizer):
    batch = _token_batch(tiny_tokenizer, toy_sentences(4))
    labels = batch.pop("labels")
    model = tiny_token_model(tiny_tokenizer).eval()
    feats = capture(model, batch, hidden_states=True)
    spec = TermSpec({"kd": 1.0, "ce": 1.0, "hidden_mse": 1.0}, [(1, 1)])
    out = compute_terms(spec, feats, feats, labels, temperature=2.0, task="token-classification")
    n_labeled = int((labels != UNLABELED).sum())
    assert float(out["kd"][0]) == pytest.approx(0.0, abs=1e-5) and int(out["kd"][1]) == n_labeled
    assert int(out["ce"][1]) == n_labeled
    assert int(out["hidden_mse"][1]) == int(batch["attention_mask"].sum()) * model.config.hidden_size
    flat = model(**batch).logits.flatten(0, 1)[labels.flatten() != UNLABELED]
    ref = torch.nn.functional.cross_entropy(flat, labels.flatten()[labels.flatten() != UNLABELED], reduction="sum")
    assert float(out["ce"][0]) == pytest.approx(float(ref), rel=1e-5)


def test_grad_accumulation_matches_one_big_batch(tiny_tokenizer):
    """Token terms are normalised over the labeled tokens of the whole step: two micro-batches with different
    numbers of labeled tokens give the loss and gradients of one batch (float64 models)."""
    sentences = toy_sentences(4, seed=5)
    big = _token_batch(tiny_tokenizer, sentences)
    halves = [{k: v[:2] for k, v in big.items()}, {k: v[2:] for k, v in big.items()}]
    assert (halves[0]["labels"] != UNLABELED).sum() != (halves[1]["labels"] != UNLABELED).sum()
    teacher = tiny_token_model(tiny_tokenizer, seed=1).double().eval()
    spec = TermSpec({"kd": 1.0, "ce": 0.5, "hidden_mse": 0.1, "attention_kl": 0.1}, [(1, 2), (2, 4)])
    accelerator = make_accelerator(TrainConfig())
    results = []
    for group in ([big], halves):
        student = tiny_token_model(tiny_tokenizer, layers=2, seed=2).double().train()
        student.config.hidden_dropout_prob = student.config.attention_probs_dropout_prob = 0.0
        student.eval()  # no dropout: the two paths see the same network

        def terms_of(batch):
            batch = dict(batch)
            labels = batch.pop("labels")
            t = capture(teacher, batch, hidden_states=True, attentions=True)
            s = capture(student, batch, hidden_states=True, attentions=True)
            return [(compute_terms(spec, s, t, labels, temperature=2.0, task="token-classification"), spec.active)]

        logged = {}
        backward_group(accelerator, [dict(b) for b in group], terms_of, [logged], task="token-classification")
        results.append((logged, [p.grad.clone() for p in student.parameters() if p.grad is not None]))
    (one, g_one), (two, g_two) = results
    for k in one:
        assert two[k] == pytest.approx(one[k], rel=1e-6)
    for a, b in zip(g_one, g_two):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------------------------------- metrics

def test_entity_metrics_by_hand():
    true = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O", "B-PER"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O", "O"]]
    m = entity_metrics(true, pred)
    # gold: PER(0-1), LOC(3), ORG, PER = 4; predicted: PER(0-1), ORG(3), ORG = 3; correct: PER(0-1), ORG = 2
    assert m["entity_precision"] == pytest.approx(2 / 3)
    assert m["entity_recall"] == pytest.approx(2 / 4)
    assert m["entity_f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert m["per_type"]["PER"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert m["per_type"]["LOC"]["f1"] == 0.0
    assert m["token_accuracy"] == pytest.approx(5 / 7)


def test_a_wrong_boundary_is_a_miss():
    m = entity_metrics([["B-PER", "I-PER"]], [["B-PER", "O"]])
    assert m["entity_f1"] == 0.0


def test_entity_spans_have_character_offsets():
    text = "John Smith went to New York"
    offsets = [(0, 0), (0, 4), (5, 10), (11, 15), (16, 18), (19, 22), (23, 27), (0, 0)]
    word_ids = [None, 0, 1, 2, 3, 4, 5, None]
    labels = ["B-PER", "I-PER", "O", "B-LOC", "I-LOC"]
    probs = torch.nn.functional.one_hot(torch.tensor([2, 0, 1, 2, 2, 3, 4, 2]), 5).float().numpy()
    spans = entity_spans(text, probs, offsets, word_ids, labels)
    assert spans == [{"type": "PER", "text": "John Smith", "start": 0, "end": 10, "score": 1.0},
                     {"type": "LOC", "text": "New York", "start": 19, "end": 27, "score": 1.0}]


# ------------------------------------------------------------------------------------ tiny run, deploy

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_tokenizer):
    """`kdistill run` of a token-classification recipe: a tiny random BERT token classifier as teacher (fine-tuned
    for 1 epoch), a 2-layer student with KD, the no-KD baseline, evaluation, ONNX export, report."""
    from kdistill.pipeline import run

    root = tmp_path_factory.mktemp("ner")
    teacher_dir = root / "teacher-init"
    save_model(tiny_token_model(tiny_tokenizer), tiny_tokenizer, teacher_dir, {"task": "token-classification"})
    train = write_conll(root / "train.conll", toy_sentences(64, seed=1), columns=4)
    test = root / "test.jsonl"
    test.write_text("\n".join(json.dumps(s) for s in toy_sentences(16, seed=2)), encoding="utf-8")
    recipe = root / "ner.yaml"
    recipe.write_text(json.dumps({
        "name": "tiny-ner", "task": "token-classification",
        "data": {"train_file": str(train), "test_file": str(test), "max_length": 32},
        "teacher": {"model": str(teacher_dir), "epochs": 6, "lr": 3e-3, "batch_size": 8},
        "student": {"layers": 2},
        "distill": {"losses": {"kd": 1.0, "ce": 0.5, "hidden_mse": 0.1}},
        "train": {"epochs": 2, "batch_size": 8, "lr": 3e-3, "warmup_ratio": 0.0},
        "eval": {"repeats": 2, "warmup": 1},
        "export": {"formats": ["onnx"]},
    }), encoding="utf-8")
    run_dir = run(load_config(recipe, []), root / "run")
    return run_dir


def test_tiny_run_writes_entity_metrics_report_and_onnx(tiny_run):
    metrics = json.loads((tiny_run / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["task"] == "token-classification"
    assert set(metrics["models"]) == {"teacher", "student", "baseline"}
    for m in metrics["models"].values():
        assert 0.0 <= m["entity_f1"] <= 1.0 and 0.0 <= m["token_accuracy"] <= 1.0
        assert set(m["per_type"]) <= {"POL", "SPO", "TEC"}
    assert metrics["models"]["teacher"]["entity_f1"] > 0.0  # it learned something in 6 epochs
    assert "entity_f1_retained_pct" in metrics["models"]["student"]
    history = json.loads((tiny_run / "logs" / "history_student.json").read_text(encoding="utf-8"))
    assert {"kd", "ce", "hidden_mse"} <= set(history["steps"][0])
    assert "entity_f1" in history["evals"][0]
    report = (tiny_run / "report.md").read_text(encoding="utf-8")
    assert "entity F1" in report and "Entity F1 per type" in report
    parity = metrics["exports"]["onnx"]
    assert parity["backends"]["onnx"]["max_abs_logit_diff"] < 1e-3
    assert parity["backends"]["onnx"]["argmax_agreement"] == 1.0
    assert json.loads((tiny_run / "student" / "kdistill.json").read_text())["task"] == "token-classification"


def test_onnx_export_matches_pytorch_token_logits(tiny_run, tmp_path):
    texts = ["team coach goals today", "the minister says vote", "chip data network"]
    parity = export_model(tiny_run / "student", fmt="onnx", out_dir=tmp_path / "onnx", parity_texts=texts)
    assert parity["backends"]["onnx"]["max_abs_logit_diff"] < 1e-3
    torch_pred = load_predictor(tiny_run / "student", backend="torch")
    onnx_pred = load_predictor(tmp_path / "onnx", backend="onnx")
    a, _ = torch_pred.predict_logits(texts)
    b, _ = onnx_pred.predict_logits(texts)
    n_tokens = sum(len(ids) for ids in torch_pred.tokenizer(texts)["input_ids"])
    assert a.shape == b.shape == (n_tokens, 5)  # one row per real token of every text
    assert abs(a - b).max() < 1e-3
    spans = [[(e["start"], e["end"], e["type"]) for e in p["entities"]] for p in torch_pred.predict(texts)]
    assert spans == [[(e["start"], e["end"], e["type"]) for e in p["entities"]] for p in onnx_pred.predict(texts)]


def test_predict_returns_spans_whose_offsets_index_the_text(tiny_run):
    predictor = load_predictor(tiny_run / "student", backend="torch")
    texts = ["the team coach says goals today", "minister vote"]
    for text, pred in zip(texts, predictor.predict(texts)):
        assert set(pred) == {"entities"}
        for e in pred["entities"]:
            assert text[e["start"]:e["end"]] == e["text"] and e["type"] in {"POL", "SPO", "TEC"}
            assert 0.0 < e["score"] <= 1.0


def test_server_answers_with_entities_over_http(tiny_run):
    import uvicorn

    from kdistill.deploy.serve import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(tiny_run / "student"), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)
        text = "the team coach says goals today"
        req = urllib.request.Request(f"http://127.0.0.1:{port}/predict", data=json.dumps({"text": text}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            body = json.loads(r.read())
        direct = load_predictor(tiny_run / "student", backend="torch").predict([text])[0]
        got = body["prediction"]["entities"]
        assert [{k: v for k, v in e.items() if k != "score"} for e in got] == \
            [{k: v for k, v in e.items() if k != "score"} for e in direct["entities"]]
        assert [e["score"] for e in got] == pytest.approx([e["score"] for e in direct["entities"]], abs=1e-5)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metadata", timeout=30) as r:
            assert json.loads(r.read())["task"] == "token-classification"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


# --------------------------------------------------------------------------------- real built-in data

def test_peoples_daily_builtin_split_sizes_and_tags():
    bundle = load_token_data(DataConfig(dataset="peoples-daily-ner", limit=None))
    sizes = {s: len(bundle.splits[s]) for s in ("train", "validation", "test")}
    assert sum(sizes.values()) == 19484
    assert bundle.label_names == ["B-LOC", "B-ORG", "B-PER", "I-LOC", "I-ORG", "I-PER", "O"]


def test_evaluate_verb_scores_a_token_model_on_a_file(tiny_run, tmp_path, capsys):
    from kdistill.cli import evaluate

    data = tmp_path / "more.jsonl"
    data.write_text("\n".join(json.dumps(s) for s in toy_sentences(20, seed=7)), encoding="utf-8")
    metrics = evaluate(tiny_run / "student", str(data), split="all", out=tmp_path / "m.json")
    assert metrics["n_test"] == 20 and 0.0 <= metrics["entity_f1"] <= 1.0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["entity_f1"] == metrics["entity_f1"]
    assert json.loads((tmp_path / "m.json").read_text())["entity_f1"] == metrics["entity_f1"]
