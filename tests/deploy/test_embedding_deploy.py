"""Deploying a sentence encoder (task embedding): predict returns the vectors sentence-transformers computes, the
ONNX export matches PyTorch, and the server answers POST /embed over real HTTP with /predict's validation."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from kdistill.deploy.export import export_model
from kdistill.deploy.predict import EmbeddingPredictor, load_predictor, pool_numpy
from kdistill.deploy.serve import create_app
from kdistill.features import Pooling
from tests.deploy.test_serve import _Server
from tests.helpers import finish, start_kdistill, tiny_encoder_dir

TEXTS = ["the team won the match", "new chip for the phone network", "vote", "a big report says the minister"]


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory, tiny_tokenizer):
    return tiny_encoder_dir(tmp_path_factory.mktemp("enc") / "encoder", tiny_tokenizer, Pooling("mean", True))


def test_pool_numpy_hand_case():
    h = np.array([[[1.0, 0.0], [3.0, 4.0], [100.0, 100.0]]], dtype=np.float32)
    mask = np.array([[1, 1, 0]])
    assert pool_numpy(h, mask, "mean", False).tolist() == [[2.0, 2.0]]
    assert pool_numpy(h, mask, "max", False).tolist() == [[3.0, 4.0]]
    assert pool_numpy(h, mask, "cls", False).tolist() == [[1.0, 0.0]]
    np.testing.assert_allclose(pool_numpy(h, mask, "mean", True), [[2 ** -0.5, 2 ** -0.5]], rtol=1e-6)


def test_predict_gives_sentence_transformers_vectors(encoder_dir, tmp_path):
    predictor = load_predictor(encoder_dir)
    assert isinstance(predictor, EmbeddingPredictor) and predictor.backend == "torch"
    assert predictor.metadata["task"] == "embedding" and predictor.metadata["dim"] == 32
    expected = SentenceTransformer(str(encoder_dir), device="cpu").encode(TEXTS, convert_to_numpy=True)
    got = np.array([r["embedding"] for r in predictor.predict(TEXTS, batch_size=3)])  # batches mix lengths
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # the CLI verb prints one JSON line per text with its vector
    done = finish(start_kdistill("predict", encoder_dir, TEXTS[0], TEXTS[2]), timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    np.testing.assert_allclose([line["embedding"] for line in lines], expected[[0, 2]], atol=1e-5)


def test_onnx_export_parity(encoder_dir, tmp_path):
    parity = export_model(encoder_dir, fmt="onnx", out_dir=tmp_path / "onnx", parity_texts=TEXTS)
    assert parity["backends"]["onnx"]["max_abs_logit_diff"] < 1e-4
    assert (tmp_path / "onnx" / "modules.json").is_file()  # the pooling travels with the graph
    onnx = load_predictor(tmp_path / "onnx")
    assert onnx.backend == "onnx"
    torch_vectors, _ = load_predictor(encoder_dir).predict_logits(TEXTS)
    onnx_vectors, _ = onnx.predict_logits(TEXTS)
    assert onnx_vectors.shape == (len(TEXTS), 32)
    assert np.abs(onnx_vectors - torch_vectors).max() < 1e-4


def test_server_embeds_over_http(encoder_dir, tiny_bert_dir):
    expected, _ = load_predictor(encoder_dir).predict_logits(TEXTS)
    with _Server(create_app(encoder_dir, max_batch_texts=8, max_text_chars=200)) as url:
        one = httpx.post(f"{url}/embed", json={"text": TEXTS[0]}, timeout=30)
        assert one.status_code == 200
        np.testing.assert_allclose(one.json()["embedding"], expected[0], atol=1e-5)
        many = httpx.post(f"{url}/embed", json={"texts": TEXTS}, timeout=30)
        np.testing.assert_allclose(many.json()["embeddings"], expected, atol=1e-5)
        predicted = httpx.post(f"{url}/predict", json={"texts": TEXTS[:2]}, timeout=30).json()
        np.testing.assert_allclose([p["embedding"] for p in predicted["predictions"]], expected[:2], atol=1e-5)
        for body, message in [({"text": "  "}, "text is empty"), ({"texts": []}, "must not be empty"),
                              ({"texts": ["a"] * 9}, "too many texts"), ({"text": "x" * 201}, "characters"),
                              ({"nope": 1}, "")]:
            r = httpx.post(f"{url}/embed", json=body, timeout=30)
            assert r.status_code == 422 and message in r.json()["detail"], (body, r.text)
        assert httpx.get(f"{url}/metadata", timeout=30).json()["dim"] == 32
    with _Server(create_app(tiny_bert_dir)) as url:  # a classifier has no /embed
        assert httpx.post(f"{url}/embed", json={"text": "goal"}, timeout=30).status_code == 404
