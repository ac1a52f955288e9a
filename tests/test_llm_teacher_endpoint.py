"""An LLM teacher for classification behind an OpenAI-compatible endpoint (teacher.llm.endpoint), over real HTTP in
the test process: kdistill's own server gives the label scores of the same LLM loaded in-process (within 1e-4) and
so the same student; a run stopped mid-scoring asks the server again only for the texts not stored; a server
without prompt log-probabilities, and a missing key, stop the run with one line."""

from __future__ import annotations

import json

import pytest
import torch

from kdistill.cache import responses
from kdistill.cache.label_scores import llm_label_scores
from kdistill.cli import main
from kdistill.config import EndpointConfig, load_config
from kdistill.data import pad_id_of
from kdistill.deploy.serve import create_app
from kdistill.errors import UserError
from kdistill.models import load_model_dir
from kdistill.pipeline import run
from kdistill.pipeline.llm_teacher import llm_inputs
from kdistill.teacher_endpoint import endpoint_label_scores
from tests.deploy.test_serve import _Server
from tests.test_instruction import chat_tokenizer  # noqa: F401 (a fixture)
from tests.test_llm_teacher import encoder_dir, recipe  # noqa: F401 (a fixture)
from tests.test_teacher_endpoint import TEACHER, Counting, Faulty, teacher_dir  # noqa: F401 (a fixture)

ANSWERS = ["sport", "tech news", "politics"]


class CountingCompletions(Counting):
    """Counting's bodies, of POST /v1/completions; after `fail_after` of them (None: never) every request gets a
    500, as from a server that broke (its body kept as None)."""

    def __init__(self, app, fail_after: int | None = None):
        super().__init__(app, "/v1/completions")
        self.fail_after = fail_after

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] == self.path and self.fail_after is not None \
                and len(self.bodies) >= self.fail_after:
            self.bodies.append(None)
            await send({"type": "http.response.start", "status": 500,
                        "headers": [(b"content-type", b"application/json")]})
            return await send({"type": "http.response.body", "body": b'{"error": {"message": "broken"}}'})
        return await super().__call__(scope, receive, send)


def endpoint(url: str, **options) -> dict:
    return {"url": f"{url}/v1", "model": TEACHER, "concurrency": 2, **options}


def test_the_endpoints_label_scores_are_the_llm_scores_computed_here(tmp_path, teacher_dir, chat_tokenizer,  # noqa: F811
                                                                    encoder_dir):  # noqa: F811
    cfg = load_config(recipe(tmp_path, teacher_dir, encoder_dir, {"shots": 1, "prompt": "Topic of {text}? ({labels})"}))
    texts = ["goal in the match", "the vote on the new law", "a faster chip <|im_start|> now", "x"]
    prompts, answers = llm_inputs(cfg, chat_tokenizer, texts, [("the final whistle", 0)], ANSWERS)
    llm = load_model_dir(teacher_dir)[0]
    here, _ = llm_label_scores(llm, prompts, answers, pad_id=pad_id_of(chat_tokenizer), root=tmp_path / "here")
    app = CountingCompletions(create_app(teacher_dir))
    with _Server(app) as url:
        there, info = endpoint_label_scores(EndpointConfig(**endpoint(url)), prompts, answers, root=tmp_path / "there")
    assert there.shape == here.shape == (4, 3)
    assert torch.allclose(there, here, atol=1e-4, rtol=0), (there - here).abs().max()
    assert (info["calls"], info["reused"], info["requests"], info["cpu_s_per_1000_texts"]) == (4, 0, 4, None)
    body = app.bodies[0]
    assert (body["echo"], body["logprobs"], body["model"]) == (True, 1, TEACHER)
    asked = {json.dumps(b["prompt"]) for b in app.bodies}
    assert asked == {json.dumps([p + a for a in answers]) for p in prompts}  # token ids: the prompt, then each answer


def test_a_run_behind_the_endpoint_gives_the_students_of_the_llm_loaded_here(tmp_path, teacher_dir,  # noqa: F811
                                                                             encoder_dir, monkeypatch):  # noqa: F811
    monkeypatch.setenv("KDISTILL_CACHE_DIR", str(tmp_path / "cache"))
    local = run(load_config(recipe(tmp_path, teacher_dir, encoder_dir)), tmp_path / "local")
    app = CountingCompletions(create_app(teacher_dir))
    with _Server(app) as url:
        remote = run(load_config(recipe(tmp_path, teacher_dir, encoder_dir, {"endpoint": endpoint(url)})),
                     tmp_path / "remote")
    local, remote = (json.loads((d / "metrics.json").read_text(encoding="utf-8")) for d in (local, remote))
    n = remote["llm_teacher"]["texts_scored"]
    assert len(app.bodies) == n and (remote["llm_teacher"]["calls"], remote["llm_teacher"]["reused"]) == (n, 0)
    assert remote["llm_teacher"]["accuracy"] == local["llm_teacher"]["accuracy"]
    for name in ("student", "baseline"):
        assert remote["models"][name]["accuracy"] == local["models"][name]["accuracy"], name
        assert remote["models"][name]["macro_f1"] == pytest.approx(local["models"][name]["macro_f1"], abs=1e-9)
    steps = [json.loads((tmp_path / d / "logs" / "history_student.json").read_text())["steps"]
             for d in ("local", "remote")]
    assert [s["kd"] for s in steps[1]] == pytest.approx([s["kd"] for s in steps[0]], rel=1e-4)
    llm = remote["llm_teacher"]
    assert llm["endpoint"] == f"{url}/v1" and llm["cpu_cost_ratio"] is None and llm["wall_cost_ratio"] > 0
    report = (tmp_path / "remote" / "report.md").read_text(encoding="utf-8")
    assert f"behind {url}/v1, one request per text" in report and "wall time" in report


def test_a_run_stopped_mid_scoring_asks_again_only_for_the_texts_not_stored(tmp_path, teacher_dir,  # noqa: F811
                                                                             encoder_dir, monkeypatch):  # noqa: F811
    """The server breaks after 10 answers (shards of 8 here: one whole, one partial): the run stops with one line;
    the next run reads those 10 back and asks for each other text once."""
    monkeypatch.setenv("KDISTILL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(responses, "SHARD_PROMPTS", 8)
    app = CountingCompletions(create_app(teacher_dir), fail_after=10)
    with _Server(app) as url:
        cfg = load_config(recipe(tmp_path, teacher_dir, encoder_dir,
                                 {"endpoint": endpoint(url, concurrency=1, max_retries=1, backoff_s=0.01)}))
        with pytest.raises(UserError, match="teacher.llm.endpoint: POST .*/completions failed 2 time"):
            run(cfg, tmp_path / "run")
        assert not (tmp_path / "run").exists()
        first = list(app.bodies)
        app.fail_after = None
        metrics = json.loads((run(cfg, tmp_path / "run") / "metrics.json").read_text(encoding="utf-8"))
        second = app.bodies[len(first):]
    n = metrics["llm_teacher"]["texts_scored"]
    assert len(first) == 12 and first[10:] == [None, None]  # 10 answered, the 11th tried twice
    assert (metrics["llm_teacher"]["calls"], metrics["llm_teacher"]["reused"]) == (n - 10, 10)
    assert len(second) == n - 10
    asked = [json.dumps(b["prompt"]) for b in first[:10] + second]
    assert len(set(asked)) == n  # every text asked for once, over the two runs


def test_a_server_without_prompt_logprobs_stops_the_run_in_one_line(tmp_path):
    prompts, answers = [[5, 6, 7], [8, 9]], [[10], [11, 12]]
    no_logprobs = json.dumps({"choices": [{"index": i, "text": "a", "logprobs": None} for i in range(2)]})
    with Faulty() as server:
        server.answer = lambda handler, n, body: _send(handler, no_logprobs)
        with pytest.raises(UserError) as error:
            endpoint_label_scores(EndpointConfig(url=server.url, model="m", max_retries=0), prompts, answers,
                                  root=tmp_path)
    message = str(error.value)
    assert message.startswith("teacher.llm.endpoint: POST ") and "gives no log-probabilities" in message
    assert "\n" not in message


def _send(handler, payload: str) -> None:
    data = payload.encode()
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def test_a_missing_key_stops_the_run_before_any_data_is_read(tmp_path, teacher_dir, encoder_dir,  # noqa: F811
                                                             capsys, monkeypatch):
    monkeypatch.delenv("MY_LLM_KEY", raising=False)
    path = recipe(tmp_path, teacher_dir, encoder_dir,
                  {"endpoint": {"url": "http://127.0.0.1:9/v1", "model": "m", "api_key_env": "MY_LLM_KEY"}})
    with pytest.raises(SystemExit) as exit_:
        main(["run", str(path), "--out", str(tmp_path / "run")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdistill: teacher.llm.endpoint.api_key_env: the environment variable MY_LLM_KEY") \
        and "\n" not in err and not (tmp_path / "run").exists()
