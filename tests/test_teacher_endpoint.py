"""A teacher behind an OpenAI-compatible endpoint (teacher.endpoint), over real HTTP in the test process: kdistill's
own server gives the answers of the same teacher loaded in-process, and so the same student; a faulty server of the
test's making is retried while its faults pass and stops the run with one line when they do not, within the
concurrency bound and the rate limit; a killed labelling pass resumes asking only for the prompts not stored;
llama.cpp's server, where llama-cpp-python is installed."""

from __future__ import annotations

import collections
import json
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kdistill.cache import responses
from kdistill.config import EndpointConfig, load_config
from kdistill.data import ChatExample
from kdistill.data.instructions import load_instruction_data
from kdistill.deploy.serve import create_app
from kdistill.errors import UserError
from kdistill.generation import generate
from kdistill.models import save_model
from kdistill.pipeline import run
from kdistill.tasks.instruction import Reader
from kdistill.teacher_endpoint import endpoint_responses
from tests.deploy.test_serve import _free_port, _Server
from tests.helpers import finish, start_kdistill, write_recipe
from tests.test_instruction import chat_model_dir, chat_rows, chat_tokenizer  # noqa: F401 (a fixture)

TEACHER = "teacher"  # the served model's name: its dir's


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, chat_tokenizer):  # noqa: F811
    """A random 2-layer Llama over the ChatML tokenizer, saved as kdistill saves a model (its dir loads as a plain
    Hugging Face model too). A wide init: peaked distributions, so batched and one-by-one greedy answers agree."""
    torch.manual_seed(3)
    tok = chat_tokenizer
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=160,
                         initializer_range=0.3, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.eos_token_id)
    path = tmp_path_factory.mktemp("models") / TEACHER
    return save_model(LlamaForCausalLM(config), tok, path, {"task": "instruction", "max_length": 160, "role": TEACHER})


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, chat_tokenizer):  # noqa: F811
    return chat_model_dir(tmp_path_factory.mktemp("models") / "student", chat_tokenizer, layers=1, seed=1)


def recipe(tmp_path: Path, student: Path, teacher: dict, **sections) -> Path:
    """An instruction run over 60 chat rows (8 gold, the other training prompts answered by the teacher)."""
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in chat_rows(60)), encoding="utf-8")
    return write_recipe(tmp_path / "recipe.yaml", {
        "name": "instruct", "task": "instruction",
        "data": {"train_file": str(data), "labeled_limit": 8, "max_prompt_tokens": 40, "max_response_tokens": 6,
                 "test_fraction": 0.2, "validation_fraction": 0.1},
        "teacher": teacher, "student": {"model": str(student)},
        "train": {"max_steps": 3, "batch_size": 8, "lr": 1e-3},
        "eval": {"scorer": "label", "samples": 2}, **sections})


def metrics_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))


def stored(path: str) -> list:
    """The `response` column of a response store's shards, in row order."""
    return [r for f in sorted(Path(path).glob("shard-*.parquet"))
            for r in pq.read_table(f).column("response").to_pylist()]


def chats_asked(bodies: list[dict]) -> collections.Counter:
    return collections.Counter(json.dumps(b["messages"]) for b in bodies)


# ------------------------------------------------------------------------------- kdistill's own server, greedy


class Counting:
    """ASGI middleware keeping the JSON body of every POST to `path` the server receives."""

    def __init__(self, app, path: str = "/v1/chat/completions"):
        self.app, self.path, self.bodies = app, path, []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != self.path:
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        self.bodies.append(json.loads(body))

        replayed = False

        async def replay():  # the body once, then what the client does (the server waits for a hang-up)
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


def test_the_teacher_behind_kdistills_server_answers_as_the_teacher_loaded_here(
        tmp_path, teacher_dir, student_dir, chat_tokenizer, monkeypatch):  # noqa: F811
    """The same recipe (teacher.shots: 2) with the teacher loaded in-process and behind `kdistill serve`: the same
    greedy responses to the transfer and the test prompts, so the same student, step by step, and the same task
    scores; the endpoint was asked once per prompt, and its size is reported as unknown."""
    monkeypatch.setenv("KDISTILL_CACHE_DIR", str(tmp_path / "cache"))
    local = metrics_of(run(load_config(recipe(tmp_path, student_dir, {"model": str(teacher_dir), "shots": 2})),
                           tmp_path / "local"))
    app = Counting(create_app(teacher_dir))
    with _Server(app) as url:
        endpoint = {"url": f"{url}/v1", "model": TEACHER, "concurrency": 3}
        remote_dir = run(load_config(recipe(tmp_path, student_dir, {"endpoint": endpoint, "shots": 2})),
                         tmp_path / "remote")
    remote = metrics_of(remote_dir)

    reader = Reader.of(chat_tokenizer)
    local_texts = [reader.text(ids) for ids in stored(local["teacher_responses"]["path"])]
    remote_texts = [t.strip() for t in stored(remote["teacher_responses"]["path"])]
    assert remote_texts == local_texts and len(set(local_texts)) > 3  # not one answer to everything
    n_transfer, n_test = remote["data"]["transfer_prompts"], remote["data"]["sizes"]["test"]
    assert len(app.bodies) == n_transfer + n_test  # once per prompt
    first = app.bodies[0]
    assert (first["model"], first["max_tokens"], first["temperature"]) == (TEACHER, 6, 0.0)
    assert [m["role"] for m in first["messages"]] == ["user", "assistant", "user", "assistant", "user"]  # 2 shots
    assert (remote["teacher_responses"]["calls"], remote["teacher_responses"]["reused"]) == (n_transfer, 0)
    assert (remote["models"]["teacher"]["calls"], remote["models"]["teacher"]["reused"]) == (n_test, 0)

    for name in ("teacher", "student", "baseline", "untrained"):
        for key in ("task_score", "agreement_with_teacher", "response_tokens", "empty_responses"):
            assert remote["models"][name][key] == local["models"][name][key], (name, key)
    assert [s["teacher"] for s in remote["samples"]] == [s["teacher"] for s in local["samples"]]
    history = [json.loads((d / "logs" / "history_student.json").read_text())["steps"]
               for d in (tmp_path / "local", remote_dir)]
    assert [s["lm"] for s in history[0]] == [s["lm"] for s in history[1]]

    teacher = remote["models"]["teacher"]
    assert teacher["params"] is None and teacher["size_ratio_vs_teacher"] is None
    assert remote["student_shape"]["teacher"] is None and remote["teacher_endpoint"]["model"] == TEACHER
    assert remote["teacher"] == f"{TEACHER} at {url}/v1"
    report = (remote_dir / "report.md").read_text(encoding="utf-8")
    assert f"{TEACHER} behind {url}/v1" in report and "not known here" in report


# ------------------------------------------------------------------------------------- a faulty server


def echo(messages: list[dict]) -> str:
    """The faulty server's answer: the last user turn's first word, backwards (a different answer per prompt)."""
    return messages[-1]["content"].split()[0][::-1]


class Faulty:
    """An OpenAI-ish chat server on a free port whose answers a test scripts: `plan(n, body)` says what the n-th
    request (from 0) gets: None (a good answer), or one of the faults below. Records every request's body, when it
    came, and the most requests in flight at once."""

    def __init__(self, plan=lambda n, body: None, delay_s: float = 0.0):
        self.plan, self.delay_s = plan, delay_s
        self.bodies, self.arrivals, self.headers = [], [], []
        self.in_flight = self.most_in_flight = 0
        self.lock = threading.Lock()
        self.release = threading.Event()  # ends the "hang" fault
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    n = len(server.bodies)
                    server.bodies.append(body)
                    server.arrivals.append(time.monotonic())
                    server.headers.append(dict(self.headers))
                    server.in_flight += 1
                    server.most_in_flight = max(server.most_in_flight, server.in_flight)
                try:
                    server.answer(self, n, body)
                finally:
                    with server.lock:
                        server.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", _free_port()), Handler)
        # a client that gives up (a run stopping on a failed prompt) drops its other connections: expected here,
        # and socketserver would print each one's traceback into the stderr the tests read
        self.httpd.handle_error = lambda request, client_address: None
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def answer(self, handler, n: int, body: dict) -> None:
        fault = self.plan(n, body)
        time.sleep(self.delay_s)
        if fault == "hang":
            self.release.wait(60)
            fault = "500"
        if fault == "drop":  # the connection closes without an answer
            handler.close_connection = True
            handler.connection.shutdown(2)
            return
        if fault == "timeout":  # well past TIMEOUT_S, which an answer on a loaded machine stays well inside
            time.sleep(3 * TIMEOUT_S)
            fault = None
        status, headers, payload = 200, {}, None
        if fault is None:
            payload = json.dumps({"object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": echo(body["messages"])},
                 "finish_reason": "stop"}], "usage": {"prompt_tokens": 9, "completion_tokens": 2}})
        elif fault == "malformed":
            payload = '{"choices": [{"message": '
        elif fault == "no choices":
            payload = json.dumps({"object": "chat.completion", "usage": {}})
        elif fault == "null content":
            payload = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": None}}]})
        else:  # "429", "429 long", "500", "503", "401", "404"
            status = int(fault.split()[0])
            message = {429: "slow down", 500: "boom\n  at line 3", 503: "overloaded", 401: "bad key",
                       404: "no such route"}[status]
            payload = json.dumps({"error": {"message": message, "type": "server_error"}})
            if status == 429:
                headers["Retry-After"] = "3600" if fault == "429 long" else "1"
        data = payload.encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            handler.send_header(k, v)
        handler.end_headers()
        handler.wfile.write(data)

    def __enter__(self):
        # a short poll: shutdown() waits for it
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


CHATS = [[{"role": "user", "content": f"{word} is a word."}] for word in
         ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima")]


TIMEOUT_S = 1.0
"""The client's per-request timeout in these tests: the "timeout" fault answers after 3x it."""


def endpoint(url: str, **options) -> EndpointConfig:
    return EndpointConfig(url=url, model="m", **{"max_retries": 3, "backoff_s": 0.01, "timeout_s": TIMEOUT_S,
                                                 **options})


def first_twice(fault: str):
    return lambda n, body: fault if n < 2 else None


@pytest.mark.parametrize("fault", ["timeout", "drop", "429", "500", "503", "malformed", "no choices"])
def test_a_fault_that_passes_is_retried_and_every_answer_arrives(tmp_path, fault):
    with Faulty(first_twice(fault)) as server:
        texts, tokens, info = endpoint_responses(endpoint(server.url, concurrency=1), CHATS[:4], max_tokens=5,
                                                 what="prompts", root=tmp_path)
    assert texts == [echo(c) for c in CHATS[:4]] and tokens == [2] * 4
    assert (info["calls"], info["reused"], info["requests"], info["retries"]) == (4, 0, 6, 2)
    assert len(server.bodies) == 6 and server.bodies[0] == server.bodies[2]  # the first prompt, asked again
    if fault == "429":  # Retry-After: 1 is waited, not the 0.01 s back-off
        assert server.arrivals[1] - server.arrivals[0] >= 0.95 and server.arrivals[2] - server.arrivals[1] >= 0.95


@pytest.mark.parametrize("fault, says", [
    ("500", "failed 3 time(s), the last: 500 boom at line 3 (teacher.endpoint.max_retries: 2)"),
    ("503", "the last: 503 overloaded"),
    ("timeout", "the last: no answer within teacher.endpoint.timeout_s=1 s"),
    ("malformed", "the last: 200 with a body that is not JSON: {\"choices\": [{\"message\":"),
    ("no choices", "the last: 200 without choices: {\"object\": \"chat.completion\""),
    ("drop", "the last: RemoteProtocolError"),
])
def test_a_fault_that_persists_stops_after_the_retries_with_one_line(tmp_path, fault, says):
    with Faulty(lambda n, body: fault) as server:
        with pytest.raises(UserError) as error:
            endpoint_responses(endpoint(server.url, max_retries=2), CHATS[:1], max_tokens=5, what="prompts",
                               root=tmp_path)
    message = str(error.value)
    assert message.startswith(f"teacher.endpoint: POST {server.url}/chat/completions ") and says in message, message
    assert "\n" not in message and len(server.bodies) == 3


@pytest.mark.parametrize("fault, says", [
    ("401", "answered 401: bad key; the server wants a key: name its environment variable in "
            "teacher.endpoint.api_key_env"),
    ("404", "answered 404: no such route; the server needs POST /chat/completions under teacher.endpoint.url"),
    ("null content", "answers without the assistant's text (choices[0].message.content: null)"),
    ("429 long", "429 slow down, and the server asks to retry after 3600 s"),
])
def test_what_a_retry_cannot_mend_stops_at_once(tmp_path, fault, says):
    with Faulty(lambda n, body: fault) as server:
        with pytest.raises(UserError, match="^teacher.endpoint: ") as error:
            endpoint_responses(endpoint(server.url), CHATS[:1], max_tokens=5, what="prompts", root=tmp_path)
    assert says in str(error.value) and "\n" not in str(error.value) and len(server.bodies) == 1


def test_concurrency_and_the_rate_limit_hold_at_the_server(tmp_path):
    with Faulty(delay_s=0.2) as server:
        endpoint_responses(endpoint(server.url, concurrency=3), CHATS, max_tokens=5, what="prompts",
                           root=tmp_path / "a")
    assert server.most_in_flight == 3  # the bound is used, and held
    with Faulty(delay_s=0.2) as server:  # 0.1 s apart would allow 2 in flight; 600 per minute is 0.1 s apart
        endpoint_responses(endpoint(server.url, concurrency=4, requests_per_minute=600), CHATS[:8], max_tokens=5,
                           what="prompts", root=tmp_path / "b")
    starts = sorted(server.arrivals)
    assert all(t - starts[0] >= 0.1 * i - 0.03 for i, t in enumerate(starts)), [t - starts[0] for t in starts]
    assert server.most_in_flight <= 3


def test_the_key_is_read_from_the_named_variable_and_sent_as_bearer(tmp_path, monkeypatch):
    monkeypatch.setenv("KDISTILL_TEST_TEACHER_KEY", "s3cret")
    with Faulty() as server:
        endpoint_responses(endpoint(server.url, api_key_env="KDISTILL_TEST_TEACHER_KEY"), CHATS[:1], max_tokens=5,
                           what="prompts", root=tmp_path)
    assert server.headers[0]["Authorization"] == "Bearer s3cret"
    monkeypatch.delenv("KDISTILL_TEST_TEACHER_KEY")
    with pytest.raises(UserError, match="^teacher.endpoint.api_key_env: the environment variable "
                                        "KDISTILL_TEST_TEACHER_KEY is not set"):
        endpoint_responses(endpoint(server.url, api_key_env="KDISTILL_TEST_TEACHER_KEY"), CHATS[:1], max_tokens=5,
                           what="prompts", root=tmp_path)


@pytest.mark.parametrize("problem", ["server fails", "key missing"])
def test_the_cli_exits_2_with_one_line_and_no_run_dir(tmp_path, student_dir, problem, capsys, monkeypatch):
    from kdistill.cli import main

    monkeypatch.setenv("KDISTILL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("KDISTILL_TEST_TEACHER_KEY", raising=False)
    with Faulty(lambda n, body: "503") as server:
        options = {"max_retries": 1, "backoff_s": 0.01} if problem == "server fails" else \
            {"api_key_env": "KDISTILL_TEST_TEACHER_KEY"}
        path = recipe(tmp_path, student_dir, {"endpoint": {"url": server.url, "model": "m", **options}})
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main(["run", str(path), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    if problem == "server fails":
        assert f"POST {server.url}/chat/completions failed 2 time(s), the last: 503 overloaded" in err
    else:
        assert "teacher.endpoint.api_key_env: the environment variable KDISTILL_TEST_TEACHER_KEY is not set" in err
        assert not server.bodies
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------- kill and resume


def transfer_chats(cfg) -> list[list[dict]]:
    """The transfer prompts' conversations, in row order, as the run sends them (no shots)."""
    return [list(e.prompt) for e in load_instruction_data(cfg.data).transfer]


def test_a_run_stopped_mid_labelling_resumes_asking_only_for_the_missing_prompts(tmp_path, student_dir,
                                                                                 monkeypatch):
    """The server fails for good after 10 answers (shards of 8 here: one whole, one partial): the run stops with
    exit 2's error; the next run reads those 10 from the store and asks for the other prompts only, each once."""
    monkeypatch.setenv("KDISTILL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(responses, "SHARD_PROMPTS", 8)
    broken = [True]
    with Faulty(lambda n, body: "500" if broken[0] and n >= 10 else None) as server:
        cfg = load_config(recipe(tmp_path, student_dir, {"endpoint": {"url": server.url, "model": "m",
                                                                      "concurrency": 1, "max_retries": 1,
                                                                      "backoff_s": 0.01}}))
        with pytest.raises(UserError, match="failed 2 time"):
            run(cfg, tmp_path / "run")
        assert not (tmp_path / "run").exists()
        first = list(server.bodies)
        broken[0] = False
        metrics = metrics_of(run(cfg, tmp_path / "run"))
        second = server.bodies[len(first):]
    chats = transfer_chats(cfg)
    n, n_test = len(chats), metrics["data"]["sizes"]["test"]
    assert n == metrics["data"]["transfer_prompts"] > 16 and len(first) == 12  # 10 answered, the 11th tried twice
    assert [b["messages"] for b in first[:10]] == chats[:10]
    assert [b["messages"] for b in second[: n - 10]] == chats[10:] and len(second) == n - 10 + n_test
    answers = metrics["teacher_responses"]
    assert (answers["calls"], answers["reused"]) == (n - 10, 10)
    assert stored(answers["path"]) == [echo(c) for c in chats]  # each answer in its prompt's row
    assert len(list(Path(answers["path"]).glob("shard-*.parquet"))) == -(-n // 8)
    report = (tmp_path / "run" / "report.md").read_text(encoding="utf-8")
    assert f"({n - 10} calls, 10 read from the store, stored for reuse)" in report


def test_a_run_killed_mid_labelling_resumes_asking_only_for_the_missing_prompts(tmp_path, student_dir, monkeypatch):
    """`kdistill run` in a subprocess, SIGKILLed once the store holds 7 answers (the server answers 7 requests,
    then holds the next 2 in flight): the next run asks for every other prompt once, for none of the 7."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("KDISTILL_CACHE_DIR", str(cache))
    with Faulty(lambda n, body: "hang" if n >= 7 else None) as server:
        path = recipe(tmp_path, student_dir, {"endpoint": {"url": server.url, "model": "m", "concurrency": 2}})
        proc = start_kdistill("run", path, "--out", tmp_path / "run", env={"KDISTILL_CACHE_DIR": str(cache)})
        try:
            deadline = time.monotonic() + 240
            while sum(len(stored(d)) for d in cache.glob("teacher-responses/*")) < 7 or len(server.bodies) < 9:
                assert proc.poll() is None, finish(proc).stderr[-2000:]
                assert time.monotonic() < deadline, "the store never held 7 answers"
                time.sleep(0.1)
        finally:
            proc.send_signal(signal.SIGKILL)
            finish(proc)
        assert proc.returncode == -signal.SIGKILL and not (tmp_path / "run").exists()
        killed = list(server.bodies)
        assert len(killed) == 9 and server.in_flight == 2
        server.plan = lambda n, body: None
        server.release.set()
        cfg = load_config(path)
        metrics = metrics_of(run(cfg, tmp_path / "run"))
        resumed = server.bodies[len(killed):]
    chats = transfer_chats(cfg)
    n = len(chats)
    answers = metrics["teacher_responses"]
    assert (answers["calls"], answers["reused"]) == (n - 7, 7)
    asked = chats_asked(resumed[: n - 7])
    assert asked == chats_asked([{"messages": c} for c in chats]) - chats_asked(killed[:7])
    assert chats_asked(killed[7:]) <= asked  # the 2 in flight at the kill: asked again
    assert stored(answers["path"]) == [echo(c) for c in chats]


# ------------------------------------------------------------------------------------------- llama.cpp's server


def test_llama_cpp_server_answers_as_the_teacher_loaded_here(tmp_path, teacher_dir, chat_tokenizer):  # noqa: F811
    """llama-cpp-python's OpenAI-compatible server on the teacher exported to GGUF (f32) answers as the same
    weights loaded here: the same greedy responses, its chat template read from the file."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed; install it to check a teacher behind "
                                            "llama.cpp's server")
    pytest.importorskip("llama_cpp.server.app", reason="llama-cpp-python's server extra is not installed "
                                                       "(pip install 'llama-cpp-python[server]')")
    from llama_cpp.server.app import create_app as llama_cpp_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    from kdistill.deploy.export import export_model

    export_model(teacher_dir, fmt="gguf", out_dir=tmp_path / "gguf", outtype="f32")
    gguf = next((tmp_path / "gguf").rglob("*.gguf"))
    app = llama_cpp_app(server_settings=ServerSettings(),
                        model_settings=[ModelSettings(model=str(gguf), model_alias=TEACHER, n_ctx=160, verbose=False)])
    with _Server(app) as url:
        texts, _, info = endpoint_responses(EndpointConfig(url=f"{url}/v1", model=TEACHER), CHATS[:4], max_tokens=6,
                                            what="prompts", root=tmp_path / "store")
    reader = Reader.of(chat_tokenizer)
    prompts = reader.prompts([ChatExample(tuple(c), None, {}, "test") for c in CHATS[:4]], 64)
    made = generate(LlamaForCausalLM.from_pretrained(teacher_dir), prompts, pad_id=reader.pad_id,
                    stop_ids=reader.stop_ids, max_new_tokens=6)
    assert [t.strip() for t in texts] == [reader.text(r) for r in made.responses] and info["calls"] == 4
