"""The HTTP server over real sockets: a uvicorn server in a thread, httpx clients."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import uvicorn

from kdistill.deploy.predict import load_predictor
from kdistill.deploy.serve import create_app
from kdistill.errors import UserError

API_KEY = "s3cret"
MAX_BODY = 3000
MAX_TEXTS = 8


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """uvicorn.Server on a free loopback port, in a background thread."""

    def __init__(self, app):
        self.port = _free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=20)
        assert not self.thread.is_alive(), "server did not shut down"


@pytest.fixture(scope="module")
def server(tiny_bert_dir):
    app = create_app(tiny_bert_dir, max_batch_texts=MAX_TEXTS, max_body_bytes=MAX_BODY, max_text_chars=500,
                     batch_wait_ms=10)  # fmt: skip
    with _Server(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def keyed_server(tiny_bert_dir):
    with _Server(create_app(tiny_bert_dir, api_key=API_KEY)) as url:
        yield url


def test_health_metadata_and_predictions_match_predictor(server, tiny_bert_dir, toy_examples):
    url, _ = server
    texts = [r["text"] for r in toy_examples[:MAX_TEXTS]]
    expected = load_predictor(tiny_bert_dir).predict(texts)
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("/health").json() == {"status": "ok"}
        meta = c.get("/metadata").json()
        assert meta["labels"] == ["sport", "tech", "politics"] and meta["backend"] == "torch"
        assert meta["max_length"] == 32 and meta["limits"]["max_batch_texts"] == MAX_TEXTS
        many = c.post("/predict", json={"texts": texts})
        assert many.status_code == 200
        got = many.json()["predictions"]
        one = c.post("/predict", json={"text": texts[0]}).json()["prediction"]
        assert c.post("/predict", json={"texts": ["goal match " * 30, "vote"]}).status_code == 200
        assert c.get("/metadata").json()["truncated_texts"] == meta["truncated_texts"] + 1
    assert [g["label"] for g in got] == [e["label"] for e in expected]
    assert one["label"] == expected[0]["label"] and one["label_name"] == expected[0]["label_name"]
    for g, e in zip(got, expected):
        assert g["probabilities"] == pytest.approx(e["probabilities"], abs=1e-6)


@pytest.mark.parametrize(
    "kwargs, status, message",
    [
        ({"content": b'{"text": "goal"', "headers": {"content-type": "application/json"}}, 400, "malformed JSON"),
        ({"content": b"", "headers": {"content-type": "application/json"}}, 400, "body is empty"),
        ({"content": b"\xff\xfe{]", "headers": {"content-type": "application/json"}}, 400, "malformed JSON"),
        ({"json": {"text": 5}}, 422, "text"),
        ({"json": {"texts": ["ok", 3]}}, 422, "texts.1"),
        ({"json": {"text": ["a", "b"]}}, 422, "send a list as 'texts'"),
        ({"json": ["goal"]}, 422, "JSON object"),
        ({"json": {}}, 422, "exactly one of"),
        ({"json": {"text": "a", "texts": ["b"]}}, 422, "exactly one of"),
        ({"json": {"texts": ["a"], "extra": 1}}, 422, "unknown field 'extra'"),
        ({"json": {"texts": []}}, 422, "must not be empty"),
        ({"json": {"texts": ["goal"] * (MAX_TEXTS + 1)}}, 422, "too many texts"),
        ({"json": {"text": "   "}}, 422, "text is empty"),
        ({"json": {"texts": ["ok", ""]}}, 422, "texts[1] is empty"),
        ({"json": {"text": "x" * 501}}, 422, "501 characters"),
        ({"json": {"texts": ["goal " * 90] * 8}}, 413, "at most 3000"),
    ],
)
def test_bad_requests_get_clear_4xx(server, kwargs, status, message):
    url, _ = server
    with httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/predict", **kwargs)
        assert r.status_code == status, r.text
        assert message in r.json()["detail"]
        assert c.get("/health").status_code == 200  # the server is still fine


def test_body_over_limit_without_content_length(server):
    url, _ = server

    def chunks():  # a generator body is sent chunked, with no Content-Length
        for _ in range(10):
            yield b'{"texts": ["' + b"a" * 500 + b'"]}'

    with httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/predict", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "over 3000 bytes" in r.json()["detail"]


def test_api_key(keyed_server):
    with httpx.Client(base_url=keyed_server, timeout=30) as c:
        assert c.get("/health").status_code == 200  # health stays open
        r = c.post("/predict", json={"text": "goal"})
        assert r.status_code == 401 and "missing X-API-Key" in r.json()["detail"]
        r = c.post("/predict", json={"text": "goal"}, headers={"X-API-Key": "wrong"})
        assert r.status_code == 401 and "wrong X-API-Key" in r.json()["detail"]
        assert c.get("/metadata").status_code == 401
        r = c.post("/predict", json={"text": "goal"}, headers={"X-API-Key": API_KEY})
        assert r.status_code == 200 and "prediction" in r.json()


def test_concurrent_requests_are_batched(server, tiny_bert_dir, toy_examples):
    url, app = server
    texts = [r["text"] for r in toy_examples]
    expected = {t: p["label"] for t, p in zip(texts, load_predictor(tiny_bert_dir).predict(texts))}
    before = dict(app.state.batcher.stats)
    n_requests, n_clients = 200, 16

    def client(worker: int) -> list[tuple[int, bool]]:
        results = []
        with httpx.Client(base_url=url, timeout=60) as c:
            for i in range(worker, n_requests, n_clients):
                text = texts[i % len(texts)]
                r = c.post("/predict", json={"text": text})
                ok = r.status_code == 200 and r.json()["prediction"]["label"] == expected[text]
                results.append((r.status_code, ok))
        return results

    with ThreadPoolExecutor(n_clients) as pool:
        results = [x for chunk in pool.map(client, range(n_clients)) for x in chunk]
    assert len(results) == n_requests
    assert [s for s, _ in results] == [200] * n_requests
    assert all(ok for _, ok in results)
    stats = app.state.batcher.stats
    requests = stats["requests"] - before["requests"]
    batches = stats["batches"] - before["batches"]
    assert requests == n_requests
    assert batches < requests and stats["largest_batch"] > 1
    with httpx.Client(base_url=url) as c:
        assert c.get("/metadata").json()["batching"]["batches"] == stats["batches"]


def test_full_queue_answers_503(tiny_bert_dir):
    app = create_app(tiny_bert_dir, max_queue=1, max_batch_texts=1, batch_wait_ms=0)
    predictor = app.state.predictor
    real_predict = predictor.predict_counted

    def slow_predict(texts, batch_size=32):
        time.sleep(0.3)
        return real_predict(texts, batch_size=batch_size)

    predictor.predict_counted = slow_predict  # the batcher calls this for every batch
    with _Server(app) as url:

        def post(_):
            with httpx.Client(base_url=url, timeout=30) as c:
                return c.post("/predict", json={"text": "goal"})

        with ThreadPoolExecutor(6) as pool:
            responses = list(pool.map(post, range(6)))
    codes = sorted(r.status_code for r in responses)
    assert 200 in codes and 503 in codes and set(codes) <= {200, 503}
    busy = next(r for r in responses if r.status_code == 503)
    assert "queue is full" in busy.json()["detail"] and busy.headers["retry-after"] == "1"
    assert app.state.batcher.stats["rejected_queue_full"] == codes.count(503)


def test_run_server_rejects_bad_options_before_starting(tiny_bert_dir, tmp_path):
    from kdistill.deploy.serve import run_server

    with pytest.raises(UserError, match=r"missing: not a model dir \(no such folder\)"):
        run_server(tmp_path / "missing")
    with pytest.raises(UserError, match="workers must be a positive integer"):
        run_server(tiny_bert_dir, workers=0)
    with pytest.raises(ValueError, match="unknown server option"):
        run_server(tiny_bert_dir, max_batch=3)


# ------------------------------------------------------------------------------------- hostile clients


def _wait_until(condition, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def _spy_predict(app, *, delay_s: float = 0.0, poison: str | None = None,
                 hold: threading.Event | None = None) -> list[str]:
    """Wrap the predictor the batcher calls: record every text it computes, optionally sleep (or wait until `hold`
    is set), and raise on `poison` (a failure that no up-front check catches). Returns the record."""
    predictor = app.state.predictor
    real = predictor.predict_counted
    seen: list[str] = []

    def spy(texts, batch_size=32):
        seen.extend(texts)
        time.sleep(delay_s)
        if hold is not None:
            hold.wait(timeout=60)
        if poison in texts:
            raise RuntimeError("simulated model failure")
        return real(texts, batch_size=batch_size)

    predictor.predict_counted = spy
    return seen


@pytest.mark.parametrize(
    "body, where",
    [(b'{"text": "caf\\ud800"}', "text"), (b'{"texts": ["ok", "\\udfff tail"]}', "texts[1]"),
     (b'{"texts": ["\\ud83d\\ude00 fine", "\\ude00\\ud83d"]}', "texts[1]")],  # fmt: skip
)
def test_text_that_is_not_utf8_encodable_is_422_naming_it(server, body, where):
    url, _ = server
    with httpx.Client(base_url=url, timeout=30) as c:
        json_headers = {"content-type": "application/json"}
        r = c.post("/predict", content=body, headers=json_headers)
        assert r.status_code == 422, r.text
        assert r.json()["detail"].startswith(f"{where}: ") and "surrogate" in r.json()["detail"]
        ok = c.post("/predict", content=b'{"text": "\\ud83d\\ude00 goal"}', headers=json_headers)
        assert ok.status_code == 200  # a proper surrogate pair is one character, and fine


POISON_REPEATS, GOOD_PER_ROUND = 5, 8


@pytest.mark.parametrize("poison", ["surrogate", "model failure"])
def test_a_poisoned_request_fails_alone(tiny_bert_dir, poison):
    """GOOD_PER_ROUND good requests and one poisoned one, sent at once so they share micro-batches, repeated."""
    app = create_app(tiny_bert_dir, batch_wait_ms=100, max_batch_texts=16)
    if poison == "surrogate":  # caught by the up-front check
        bad_body, bad_status = b'{"text": "goal \\ud800 match"}', 422
    else:  # passes every check, then the model fails on it: only its own request may fail
        _spy_predict(app, poison="poisoned text")
        bad_body, bad_status = b'{"text": "poisoned text"}', 500
    barrier = threading.Barrier(GOOD_PER_ROUND + 1)

    def post(i):
        body = bad_body if i == GOOD_PER_ROUND else b'{"text": "goal match %d"}' % i
        with httpx.Client(base_url=url, timeout=60) as c:
            barrier.wait()
            return i, c.post("/predict", content=body, headers={"content-type": "application/json"})

    failed_good, bad_codes = 0, []
    with _Server(app) as url:
        for _ in range(POISON_REPEATS):
            with ThreadPoolExecutor(GOOD_PER_ROUND + 1) as pool:
                for i, r in pool.map(post, range(GOOD_PER_ROUND + 1)):
                    if i == GOOD_PER_ROUND:
                        bad_codes.append(r.status_code)
                    elif r.status_code != 200 or "prediction" not in r.json():
                        failed_good += 1
    print(f"poison={poison!r}: {POISON_REPEATS} x {GOOD_PER_ROUND} good requests, failed: {failed_good}")
    assert failed_good == 0
    assert bad_codes == [bad_status] * POISON_REPEATS
    if poison != "surrogate":
        assert app.state.batcher.stats["batches_rerun_per_request"] >= 1  # it really shared a batch with good ones


def test_request_time_limit_answers_503(tiny_bert_dir):
    app = create_app(tiny_bert_dir, request_timeout_s=0.3)
    _spy_predict(app, delay_s=1.5)
    with _Server(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        start = time.monotonic()
        r = c.post("/predict", json={"text": "goal"})
        took = time.monotonic() - start
    assert r.status_code == 503 and "0.3 s" in r.json()["detail"] and r.headers["retry-after"] == "1"
    assert took < 1.2  # answered at the limit, not when the model finished


def test_a_request_whose_client_hung_up_is_not_computed(tiny_bert_dir):
    app = create_app(tiny_bert_dir, batch_wait_ms=0)
    seen = _spy_predict(app, delay_s=1.0)  # the first request keeps the model busy
    with _Server(app) as url:
        port = int(url.rsplit(":", 1)[1])
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(lambda: httpx.post(f"{url}/predict", json={"text": "first"}, timeout=30))
            _wait_until(lambda: "first" in seen)
            body = b'{"text": "abandoned"}'
            with socket.create_connection(("127.0.0.1", port)) as s:  # sends, then hangs up without reading
                s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
                time.sleep(0.2)
            assert first.result().status_code == 200
        time.sleep(0.5)
        with httpx.Client(base_url=url, timeout=30) as c:
            assert c.post("/predict", json={"text": "after"}).status_code == 200
            stats = c.get("/metadata").json()["batching"]
    assert "first" in seen and "after" in seen and "abandoned" not in seen
    assert stats["dropped_disconnected"] == 1


def test_queue_is_bounded_in_bytes(tiny_bert_dir):
    app = create_app(tiny_bert_dir, max_body_bytes=2000, max_queue_bytes=2000, max_text_chars=2000,
                     batch_wait_ms=0)  # fmt: skip
    # the model works on the first request until the second is answered (a fixed delay ran out on a loaded machine)
    release = threading.Event()
    seen = _spy_predict(app, hold=release)
    body = {"text": "goal " * 300}  # 1500 bytes of text
    with _Server(app) as url, ThreadPoolExecutor(1) as pool:
        first = pool.submit(lambda: httpx.post(f"{url}/predict", json=body, timeout=90))
        _wait_until(lambda: seen)  # the first one holds its bytes while the model works
        try:
            second = httpx.post(f"{url}/predict", json=body, timeout=30)
        finally:
            release.set()
        first = first.result()
    assert first.status_code == 200
    assert second.status_code == 503 and "max_queue_bytes=2000" in second.json()["detail"]
    assert app.state.batcher.stats["rejected_queue_full"] == 1
    with pytest.raises(UserError, match="max_queue_bytes"):
        create_app(tiny_bert_dir, max_body_bytes=2000, max_queue_bytes=1000)


def test_docs_and_schema_need_the_key_when_one_is_set(keyed_server, server):
    with httpx.Client(base_url=keyed_server, timeout=30) as c:
        for path in ("/docs", "/redoc", "/openapi.json"):
            r = c.get(path)
            assert r.status_code == 401 and "X-API-Key" in r.json()["detail"], path
            assert c.get(path, headers={"X-API-Key": API_KEY}).status_code == 200, path
        assert "/predict" in c.get("/openapi.json", headers={"X-API-Key": API_KEY}).json()["paths"]
    with httpx.Client(base_url=server[0], timeout=30) as c:  # no key set: open, as before
        assert [c.get(p).status_code for p in ("/docs", "/redoc", "/openapi.json")] == [200, 200, 200]


@pytest.mark.parametrize("chunked", [False, True])
def test_oversized_body_413_reaches_a_urllib_client(server, chunked):
    import urllib.error
    import urllib.request

    url, _ = server
    body = b'{"text": "' + b"a" * 5_000_000 + b'"}'
    data = iter([body[i : i + 65536] for i in range(0, len(body), 65536)]) if chunked else body
    req = urllib.request.Request(f"{url}/predict", data=data, headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 413
    assert f"{MAX_BODY}" in json.loads(err.value.read())["detail"]


GOOD_BODY = '{"text": "goal match"}'


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "application/json; charset=latin-1", "application/json; charset=utf-16",
                                          "application/jsonx", "multipart/form-data; boundary=x"])
def test_a_body_not_sent_as_json_is_415(server, content_type):
    url, _ = server
    headers = {"content-type": content_type} if content_type else {}
    with httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/predict", content=GOOD_BODY.encode(), headers=headers)
        assert r.status_code == 415, r.text
        detail = r.json()["detail"]
        assert detail.startswith(f"unsupported Content-Type {content_type!r}" if content_type
                                 else "unsupported Content-Type none") and "application/json" in detail


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8",
                                          "Application/JSON;charset=UTF-8", 'application/json; charset="utf-8"'])
def test_json_content_types_are_accepted(server, content_type):
    url, _ = server
    with httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/predict", content=GOOD_BODY.encode(), headers={"content-type": content_type})
        assert r.status_code == 200 and "prediction" in r.json(), r.text
        bom = c.post("/predict", content=b"\xef\xbb\xbf" + GOOD_BODY.encode(), headers={"content-type": content_type})
        assert bom.json() == r.json()  # a UTF-8 BOM is ignored, as RFC 8259 allows


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"])
def test_a_body_that_is_not_utf8_is_400(server, encoding):
    url, _ = server
    with httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/predict", content=GOOD_BODY.encode(encoding), headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        assert r.json()["detail"] == ("malformed JSON: the body is not UTF-8 (it looks like UTF-16 or UTF-32); send "
                                      "JSON encoded as UTF-8")
        latin = c.post("/predict", content='{"text": "café"}'.encode("latin-1"),
                       headers={"content-type": "application/json"})
        assert latin.status_code == 400 and latin.json()["detail"].startswith(
            "malformed JSON: the body is not UTF-8 (invalid byte at 13)"), latin.text


@pytest.mark.parametrize("body, key", [(b'{"text": "goal", "text": "vote"}', "text"),
                                       (b'{"texts": ["goal"], "texts": ["a", "b"]}', "texts"),
                                       (b'{"text": "goal", "a\\nb": 1, "a\\nb": 2}', "a\nb")])
def test_a_key_given_twice_is_400_naming_it(server, body, key):
    url, _ = server
    with httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/predict", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        detail = r.json()["detail"]
        assert detail == f"malformed JSON: key {key!r} appears twice in one object; give each key once"
        assert detail.splitlines() == [detail]
