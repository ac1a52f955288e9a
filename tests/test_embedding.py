"""task: embedding (sentence-embedding distillation, Reimers & Gurevych 2020): the pooled losses, pooling against
sentence-transformers' own encode(), the agreement / neighbour / k-NN metrics on hand cases, and a tiny run end to
end whose student sentence-transformers loads."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer

from kdistill import losses
from kdistill.cli import evaluate as evaluate_verb
from kdistill.config import load_config
from kdistill.errors import UserError
from kdistill.measure import embedding_metrics, knn_accuracy, neighbour_recall, sample_pairs, spearman_agreement
from kdistill.features import Features, Pooling, capture, pool
from kdistill.models import load_model_dir, read_pooling
from kdistill.pipeline import run
from kdistill.terms import TERMS, TermSpec, compute_terms
from tests.helpers import tiny_encoder_dir, write_recipe, write_toy_csv

# ------------------------------------------------------------------------------------------------- losses


def test_pooled_losses_are_zero_for_equal_embeddings_and_count_rows():
    t = torch.randn(5, 8)
    total, count = losses.pooled_mse(t.clone(), t)
    assert float(total) == 0.0 and float(count) == 5 * 8
    total, count = losses.pooled_cosine(3 * t, t)  # cosine ignores the length
    assert float(total) == pytest.approx(0.0, abs=1e-5) and float(count) == 5


def test_pooled_mse_matches_mse_loss_and_projects_the_student():
    torch.manual_seed(0)
    s, t = torch.randn(4, 6), torch.randn(4, 10)
    proj = torch.nn.Linear(6, 10)
    total, count = losses.pooled_mse(s, t, projection=proj)
    assert (total / count).item() == pytest.approx(torch.nn.functional.mse_loss(proj(s), t).item(), rel=1e-6)
    with pytest.raises(ValueError, match="projection"):
        losses.pooled_mse(s, t)
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        losses.pooled_mse(s[None], t[None])


def test_pooled_contrastive_analytic_case():
    # orthonormal embeddings: cos = 1 on the diagonal, 0 elsewhere -> −log(e^{1/τ} / (e^{1/τ} + B − 1)) per row
    b, tau = 4, 0.5
    e = torch.eye(b)
    total, count = losses.pooled_contrastive(e, e, temperature=tau)
    expected = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + b - 1))
    assert float(count) == b
    assert float(total) == pytest.approx(b * expected, rel=1e-6)
    # a student that swaps two texts' embeddings pays more
    swapped, _ = losses.pooled_contrastive(e[[1, 0, 2, 3]], e, temperature=tau)
    assert float(swapped) > float(total)


def test_pooled_terms_read_features_pooled_and_project_across_widths():
    spec = TermSpec({"pooled_mse": 1.0, "pooled_cosine": 1.0, "pooled_contrastive": 0.5}, [])
    assert spec.needs_pooled and not spec.needs_hidden
    spec.add_projections(6, 10)
    assert tuple(spec.projections["hidden"].weight.shape) == (10, 6)
    student = Features(logits=None, pooled=torch.randn(3, 6))
    teacher = Features(logits=None, pooled=torch.randn(3, 10))
    out = compute_terms(spec, student, teacher, None, temperature=1.0, task="embedding")
    assert {k: float(c) for k, (_, c) in out.items()} == {"pooled_mse": 30.0, "pooled_cosine": 3.0,
                                                          "pooled_contrastive": 3.0}
    assert all(TERMS[name].family == "pooled" and TERMS[name].unit == "rows" for name in out)
    with pytest.raises(ValueError, match="does not apply"):
        compute_terms(spec, student, teacher, None, temperature=1.0, task="classification")


# ------------------------------------------------------------------------------------------------ pooling


def test_pool_modes_on_a_hand_case():
    h = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [100.0, 100.0]]])  # third position is padding
    mask = torch.tensor([[1, 1, 0]])
    assert pool(h, mask, "mean").tolist() == [[2.0, 2.0]]
    assert pool(h, mask, "cls").tolist() == [[1.0, 0.0]]
    assert pool(h, mask, "max").tolist() == [[3.0, 4.0]]
    assert pool(h, mask, "mean", normalize=True)[0].tolist() == pytest.approx([2 ** -0.5, 2 ** -0.5])


@pytest.mark.parametrize("pooling", [Pooling("mean", True), Pooling("cls", False), Pooling("max", True)])
def test_pooling_matches_sentence_transformers_encode(tmp_path, tiny_tokenizer, toy_examples, pooling):
    path = tiny_encoder_dir(tmp_path / "enc", tiny_tokenizer, pooling)
    assert read_pooling(path) == pooling
    texts = [r["text"] for r in toy_examples[:7]] + ["goal"]  # different lengths: padding must not count
    expected = SentenceTransformer(str(path), device="cpu").encode(texts, convert_to_numpy=True)
    model, tokenizer, _ = load_model_dir(path)  # the dir says task embedding: the bare encoder
    assert type(model).__name__ == "BertModel"
    with torch.no_grad():
        got = capture(model, tokenizer(texts, padding=True, return_tensors="pt"), hidden_states=False,
                      pooling=read_pooling(path)).pooled
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)


def test_read_pooling_refuses_what_it_cannot_pool(tmp_path, tiny_tokenizer):
    path = tiny_encoder_dir(tmp_path / "enc", tiny_tokenizer, Pooling("mean", False))
    modules = json.loads((path / "modules.json").read_text())
    (path / "modules.json").write_text(json.dumps(modules + [
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(UserError, match="Dense"):
        read_pooling(path)
    (path / "modules.json").unlink()
    with pytest.raises(UserError, match="not a sentence-transformers model dir"):
        read_pooling(path)


# ---------------------------------------------------------------------------------------------- metrics


def test_agreement_metrics_on_hand_cases():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 8))
    assert spearman_agreement(x, x) == pytest.approx(1.0)
    assert spearman_agreement(3 * x, x) == pytest.approx(1.0)  # cosines ignore the length
    assert neighbour_recall(x, x) == 1.0
    assert neighbour_recall(x, x, k=100) == 1.0  # k capped at N − 1: every other text is a neighbour
    noisy = x + rng.normal(scale=5.0, size=x.shape)
    assert spearman_agreement(noisy, x) < 0.9 and neighbour_recall(noisy, x) < 1.0
    # other widths compare by their similarity structure alone: an orthogonal rotation + padding changes nothing
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    wider = np.concatenate([x @ q, np.zeros((30, 4))], axis=1)
    assert spearman_agreement(wider, x) == pytest.approx(1.0)


def test_neighbour_recall_and_knn_on_a_hand_case():
    # 4 points on a line of angles: each one's nearest other point is known
    angles = np.array([0.0, 0.1, 1.5, 1.6])
    teacher = np.stack([np.cos(angles), np.sin(angles)], 1)
    student = teacher[[0, 2, 1, 3]]  # texts 1 and 2 swap places
    # k=1: teacher neighbours 0->1, 1->0, 2->3, 3->2; student: 0->2, 1->3, 2->0, 3->1: none agree
    assert neighbour_recall(student, teacher, k=1) == 0.0
    index = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 0.8]])
    labels = ["a", "a", "b", "b", "b"]
    queries = np.array([[1.0, 0.05], [0.05, 1.0]])
    assert knn_accuracy(index, labels, queries, ["a", "b"], k=1) == 1.0
    assert knn_accuracy(index, labels, queries, ["a", "b"], k=5) == 0.5  # k=5: "b" outvotes "a" for both
    # a tie goes to the nearest tied neighbour's label
    assert knn_accuracy(index[:4], labels[:4], queries[:1], ["a"], k=4) == 1.0


def test_sample_pairs_are_distinct_and_deterministic():
    i, j = sample_pairs(10)
    assert len(i) == 45 and (i < j).all()
    a, b = sample_pairs(1000, max_pairs=500), sample_pairs(1000, max_pairs=500)
    assert len(a[0]) == 500 and (a[0] == b[0]).all() and (a[1] == b[1]).all()
    assert len(set(zip(a[0].tolist(), a[1].tolist()))) == 500


def test_embedding_metrics_of_the_teacher_itself():
    x = np.random.default_rng(1).normal(size=(12, 4))
    y = [i % 2 for i in range(12)]
    m = embedding_metrics(x, x, knn=(x, y, x, y))
    assert m["spearman_agreement"] == pytest.approx(1.0) and m["recall_at_10"] == 1.0
    assert m["dim"] == 4 and m["n_held_out"] == 12 and 0.0 <= m["knn_accuracy"] <= 1.0


# ---------------------------------------------------------------------------------------------- end to end


@pytest.fixture
def embedding_run(tmp_path, tiny_tokenizer):
    teacher = tiny_encoder_dir(tmp_path / "teacher", tiny_tokenizer, Pooling("mean", True))
    recipe = write_recipe(tmp_path / "emb.yaml", {
        "name": "emb",
        "task": "embedding",
        "data": {"train_file": str(write_toy_csv(tmp_path / "toy.csv", 60)), "max_length": 16},
        "teacher": {"path": str(teacher)},
        "student": {"layers": 2},
        "distill": {"losses": {"pooled_mse": 1.0, "pooled_cosine": 0.5}},
        "train": {"max_steps": 6, "batch_size": 8, "lr": 3e-3, "warmup_ratio": 0.0, "eval_every": 3},
        "eval": {"repeats": 1, "warmup": 0},
        "export": {"formats": ["onnx"]},
    })
    run_dir = run(load_config(recipe, []), tmp_path / "run")
    return run_dir, teacher


def test_tiny_embedding_run_end_to_end(embedding_run, toy_examples):
    run_dir, teacher = embedding_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["task"] == "embedding" and set(metrics["models"]) == {"teacher", "student", "baseline"}
    t, s, b = (metrics["models"][k] for k in ("teacher", "student", "baseline"))
    assert t["spearman_agreement"] == pytest.approx(1.0) and t["recall_at_10"] == 1.0
    for m in (s, b):
        assert -1.0 <= m["spearman_agreement"] <= 1.0 and 0.0 <= m["knn_accuracy"] <= 1.0
        assert m["params"] < t["params"] and m["latency_ms_batch1"] > 0
    # the baseline is the untrained student: the distilled one moved away from it
    before, after = (load_file(run_dir / k / "model.safetensors") for k in ("baseline", "student"))
    assert set(before) == set(after) and not all(torch.equal(before[k], after[k]) for k in before)
    history = json.loads((run_dir / "logs" / "history_student.json").read_text())
    assert [e["step"] for e in history["evals"]] == [3, 6] and "cosine" in history["evals"][0]
    assert {"pooled_mse", "pooled_cosine"} <= set(history["steps"][0])
    assert "Spearman vs teacher" in (run_dir / "report.md").read_text()
    assert metrics["exports"]["onnx"]["backends"]["onnx"]["max_abs_logit_diff"] < 1e-4
    assert (run_dir / "export" / "onnx" / "modules.json").is_file()
    # sentence-transformers loads the student and encodes as kdistill's pooling does
    texts = [r["text"] for r in toy_examples[:5]]
    st = SentenceTransformer(str(run_dir / "student"), device="cpu").encode(texts, convert_to_numpy=True)
    model, tokenizer, meta = load_model_dir(run_dir / "student")
    assert meta["task"] == "embedding" and read_pooling(run_dir / "student") == Pooling("mean", True)
    with torch.no_grad():
        ours = capture(model, tokenizer(texts, padding=True, return_tensors="pt"), hidden_states=False,
                       pooling=Pooling("mean", True)).pooled.numpy()
    np.testing.assert_allclose(ours, st, atol=1e-5)


def test_evaluate_verb_scores_a_sentence_encoder(embedding_run, tmp_path, capsys):
    run_dir, teacher = embedding_run
    data = str(tmp_path / "toy.csv")
    metrics = evaluate_verb(run_dir / "student", data, teacher=teacher, out=tmp_path / "m.json")
    assert metrics["task"] == "embedding" and 0.0 <= metrics["knn_accuracy"] <= 1.0
    assert -1.0 <= metrics["spearman_agreement"] <= 1.0 and metrics["latency_ms_batch1"] > 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["knn_accuracy"] == metrics["knn_accuracy"]
    # the teacher measured against itself agrees exactly: the vectors compared are the two models' own
    itself = evaluate_verb(teacher, data, teacher=teacher, out=tmp_path / "t.json")
    assert itself["spearman_agreement"] == pytest.approx(1.0) and itself["recall_at_10"] == 1.0
    without = evaluate_verb(run_dir / "student", data, split="train", out=tmp_path / "s.json")
    assert "spearman_agreement" not in without and "knn_accuracy" not in without  # no teacher; train is the index


def test_unlabeled_texts_are_more_to_learn_for_the_student_only(tmp_path, tiny_tokenizer):
    teacher = tiny_encoder_dir(tmp_path / "teacher", tiny_tokenizer, Pooling("mean", True))
    more = write_toy_csv(tmp_path / "more.csv", 40, seed=7)
    recipe = write_recipe(tmp_path / "emb.yaml", {
        "name": "emb", "task": "embedding",
        "data": {"train_file": str(write_toy_csv(tmp_path / "toy.csv", 60)), "max_length": 16,
                 "unlabeled_file": str(more)},
        "teacher": {"path": str(teacher)}, "student": {"layers": 1},
        "distill": {"losses": {"pooled_mse": 1.0}},
        "train": {"epochs": 1, "batch_size": 8, "warmup_ratio": 0.0},
        "eval": {"repeats": 1, "warmup": 0},
    })
    run_dir = run(load_config(recipe, []), tmp_path / "run")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    kept = metrics["data"]["unlabeled_file_rows"]
    assert kept > 0  # (the toy rows that are also held-out texts are dropped)
    history = json.loads((run_dir / "logs" / "history_student.json").read_text())
    # one epoch over the training split plus the unlabeled texts, in batches of 8
    assert history["steps"][-1]["step"] == math.ceil((metrics["data"]["sizes"]["train"] + kept) / 8)
    with pytest.raises(UserError, match="data.augment"):
        load_config(recipe, ["data.augment.multiplier=2"])


def test_embedding_recipe_errors_name_the_key(tmp_path, tiny_tokenizer):
    teacher = tiny_encoder_dir(tmp_path / "teacher", tiny_tokenizer, Pooling("mean", True))
    base = {"name": "emb", "task": "embedding", "data": {"train_file": str(write_toy_csv(tmp_path / "t.csv", 30))},
            "teacher": {"path": str(teacher)}, "distill": {"losses": {"pooled_mse": 1.0}}}
    with pytest.raises(UserError, match="distill.strategy"):
        run(load_config(write_recipe(tmp_path / "a.yaml", base), ["distill.strategy=mutual"]), tmp_path / "a")
    with pytest.raises(UserError, match="not a sentence-transformers model dir"):
        (teacher / "modules.json").unlink()
        run(load_config(write_recipe(tmp_path / "b.yaml", base), []), tmp_path / "b")
    with pytest.raises(UserError, match="pooled_mse: does not apply"):
        load_config(write_recipe(tmp_path / "c.yaml", {**base, "task": "classification"}), [])
