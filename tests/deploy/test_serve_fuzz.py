"""Fuzzing the server: every generated request, valid or not, gets a 2xx/4xx, never a 5xx.

1. schemathesis against the server's own OpenAPI schema: schema-valid (positive) and schema-violating (negative)
   cases for every operation. (schemathesis.pytest.from_fixture does not work with pytest 9 — it sets the removed
   `Function._nodeid` — so each operation's Hypothesis strategy is driven from a plain parametrized test.)
2. Hypothesis texts that schemathesis never generates: any code point, unpaired surrogates included (JSON can
   carry them as "\\udXXX" escapes), so the exact status is known: 200 when every text is usable, else 422.

Derandomized so a failure reproduces, sized to run in well under a minute on two cores. The apps run in-process
over ASGI, lifespan and micro-batcher included.
"""

from __future__ import annotations

from collections import Counter

import json

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.generation import GenerationMode
from starlette.testclient import TestClient

from kdistill.deploy.serve import create_app

P, N = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
CASES = [("GET", "/health", P, 20), ("GET", "/metadata", P, 20), ("POST", "/predict", P, 250),
         ("POST", "/predict", N, 250)]  # fmt: skip
"""(method, path, mode, max_examples); a GET without parameters has no negative cases."""

status_counts: Counter[str] = Counter()
"""Generated requests per operation, mode and status class; reported and checked by test_fuzz_summary."""


@pytest.fixture(scope="module")
def api_schema(tiny_bert_dir):
    app = create_app(tiny_bert_dir, max_batch_texts=8, max_text_chars=2000, batch_wait_ms=1)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.mark.parametrize("method, path, mode, max_examples", CASES, ids=lambda v: str(v))
def test_no_generated_request_gets_a_5xx(api_schema, method, path, mode, max_examples):
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=max_examples, derandomize=True, database=None, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])  # fmt: skip
    def call(case):
        response = case.call()
        status_counts[f"{method} {path} {mode} {response.status_code // 100}xx"] += 1
        assert response.status_code < 500, f"{method} {path} body={case.body!r}: {response.text[:300]}"

    call()


# any code point, and unpaired surrogates about as often as the rest: st.characters() alone never gives them
ANY_TEXT = st.lists(st.one_of(st.characters(), st.characters(categories=["Cs"])), max_size=30).map("".join)


@pytest.fixture(scope="module")
def client(tiny_bert_dir):
    with TestClient(create_app(tiny_bert_dir, max_batch_texts=8, batch_wait_ms=1)) as c:
        yield c


@given(texts=st.lists(ANY_TEXT, min_size=1, max_size=8), one=st.booleans())
@settings(max_examples=300, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip
def test_any_text_gets_200_or_a_422(client, texts, one):
    body = {"text": texts[0]} if one else {"texts": texts}
    response = client.post("/predict", content=json.dumps(body), headers={"content-type": "application/json"})
    status_counts[f"POST /predict any-text {response.status_code // 100}xx"] += 1
    sent = texts[:1] if one else texts
    usable = all(t.strip() and not any(0xD800 <= ord(c) <= 0xDFFF for c in t) for t in sent)
    assert response.status_code == (200 if usable else 422), (body, response.text[:300])


def test_fuzz_summary():
    """Runs after the fuzz tests (file order): requests were really generated, none got a 5xx."""
    total = sum(status_counts.values())
    server_errors = sum(n for key, n in status_counts.items() if key.endswith(" 5xx"))
    print(f"\nfuzz: {total} requests, 5xx: {server_errors}, by status: {dict(sorted(status_counts.items()))}")
    assert server_errors == 0
    for mode in ("positive", "negative", "any-text"):
        predict_calls = sum(n for key, n in status_counts.items() if key.startswith(f"POST /predict {mode} "))
        assert predict_calls >= 100, (mode, predict_calls)
