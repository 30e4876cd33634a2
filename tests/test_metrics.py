"""`GET /metrics` of a real `dg-edit serve`, scraped as Prometheus scrapes it and parsed with
prometheus-client's own text parser: requests of several routes (answered, refused, failed in the
model, cancelled) must move exactly the counters and histograms they should.

The tiny random model with steady sampling (every canvas block runs exactly 8 steps) and a fault
injected into requests that carry `dg_edit.faults.MARKER`: such a request fails at its 2nd step.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from dg_edit.faults import MARKER
from dg_edit.serve_process import ServeProcess

pytestmark = pytest.mark.timeout(300)

TOKEN = "metrics-s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
STEADY = {"sampling": {"max_denoising_steps": 8, "confidence_threshold": 1e-30, "stability_threshold": 8}}
FIM = ("def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n")


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    config = tmp_path_factory.mktemp("metrics") / "steady.json"
    config.write_text(json.dumps(STEADY))
    proc = ServeProcess(["--model", str(tiny_model_dir), "--config", str(config)],
                        env={"DG_EDIT_TOKEN": TOKEN, "DG_EDIT_FAULT": "raise:2"})
    with proc:
        yield proc
    assert proc.proc.returncode == 0, proc.log()[-3000:]


def scrape(server) -> dict[tuple[str, frozenset], float]:
    """Every sample of /metrics, keyed by (sample name, labels)."""
    response = httpx.get(server.url + "/metrics", headers=AUTH, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def ws_request(server, ws, frame: dict) -> list[dict]:
    """Send one request frame and read up to its final frame."""
    await ws.send(json.dumps(frame) if isinstance(frame, dict) else frame)
    frames = []
    while True:
        reply = json.loads(await asyncio.wait_for(ws.recv(), 120))
        frames.append(reply)
        if reply["type"] in ("done", "error", "cancelled"):
            return frames


def test_metrics_need_the_token_where_every_route_does(server):
    for path in ("/metrics", "/healthz"):
        assert httpx.get(server.url + path, timeout=30).status_code == 401, path
        wrong = httpx.get(server.url + path, headers={"Authorization": "Bearer nope"}, timeout=30)
        assert wrong.status_code == 401, path
        assert httpx.get(server.url + path, headers=AUTH, timeout=30).status_code == 200, path
    # ?token= as every other route takes it (a browser tab, a curl one-liner)
    assert httpx.get(server.url + f"/metrics?token={TOKEN}", timeout=30).status_code == 200


async def test_requests_of_every_route_move_their_metrics(server):
    before = scrape(server)
    for route in ("/ws", "/v1/completions", "/infill"):
        for outcome in ("ok", "error", "cancelled"):  # every series exists before its first request
            assert ("dg_edit_requests_total", frozenset({"route": route, "outcome": outcome}.items())) in before
    assert value(before, "dg_edit_step_seconds_count") == 0

    # 1. The websocket: one answered request, one frame that is not JSON, one that fails in the model.
    prefix, suffix = FIM
    async with connect(server.ws_url, additional_headers=AUTH, max_size=None) as ws:
        done = (await ws_request(server, ws, {"type": "infill", "id": "ok", "prefix": prefix, "suffix": suffix,
                                              "max_new_tokens": 8, "seed": 1, "session": "doc"}))[-1]
        assert done["type"] == "done", done
        bad = await ws_request(server, ws, "{not json")
        assert bad[-1]["code"] == "bad_request"
        failed = (await ws_request(server, ws, {"type": "infill", "id": "boom", "prefix": MARKER + "\n" + prefix,
                                                "max_new_tokens": 8, "seed": 2}))[-1]
        assert failed["type"] == "error" and failed["code"] == "model_error", failed
    after_ws = scrape(server)
    assert value(after_ws, "dg_edit_requests_total", route="/ws", outcome="ok") == 1
    assert value(after_ws, "dg_edit_requests_total", route="/ws", outcome="error") == 2
    assert value(after_ws, "dg_edit_errors_total", route="/ws", code="bad_request") == 1
    assert value(after_ws, "dg_edit_errors_total", route="/ws", code="model_error") == 1
    assert value(after_ws, "dg_edit_request_seconds_count", route="/ws") == 1
    assert value(after_ws, "dg_edit_request_seconds_sum", route="/ws") * 1000 >= done["ms"] * 0.9
    # Every decoder forward is one step: the answer's, and the failing request's first (its 2nd raised).
    steps = value(after_ws, "dg_edit_step_seconds_count")
    assert steps == done["steps"] + 1
    assert value(after_ws, "dg_edit_step_rows_count") == steps
    assert value(after_ws, "dg_edit_step_rows_sum") >= steps  # candidate rows: one or more per step
    assert value(after_ws, "dg_edit_step_requests_sum") == steps  # one request at a time here
    assert value(after_ws, "dg_edit_step_seconds_sum") > 0
    assert value(after_ws, "dg_edit_step_seconds_bucket", le="+Inf") == steps
    assert value(after_ws, "dg_edit_queue_depth") == 0
    # The answer's prefix, and how much of it the encoder ran (the rest: the document's warm cache)
    assert value(after_ws, "dg_edit_prefix_tokens_encoded_total") <= value(after_ws, "dg_edit_prefix_tokens_total") > 0
    # The document's encoder cache, as /healthz reports it (the connection closed: the session is gone)
    health = httpx.get(server.url + "/healthz", headers=AUTH, timeout=30).json()
    assert value(after_ws, "dg_edit_cache_bytes") == health["cache"]["bytes"]
    assert value(after_ws, "dg_edit_cache_budget_bytes") == health["cache"]["budget_bytes"] > 0

    # 2. A websocket request cancelled after its first step.
    async with connect(server.ws_url, additional_headers=AUTH, max_size=None) as ws:
        await ws.send(json.dumps({"type": "infill", "id": "c", "prefix": prefix, "suffix": suffix,
                                  "max_new_tokens": 64, "seed": 3}))
        first = json.loads(await asyncio.wait_for(ws.recv(), 120))
        assert first["type"] == "step", first
        await ws.send(json.dumps({"type": "cancel", "id": "c"}))
        while (frame := json.loads(await asyncio.wait_for(ws.recv(), 120)))["type"] == "step":
            pass
        assert frame["type"] == "cancelled", frame
    after_cancel = scrape(server)
    assert value(after_cancel, "dg_edit_requests_total", route="/ws", outcome="cancelled") == 1
    assert value(after_cancel, "dg_edit_requests_total", route="/ws", outcome="ok") == 1

    # 3. The HTTP APIs: OpenAI completions (answered; a body that is not JSON), a llama.cpp /infill
    # stream, a chat request; their tokens are what each answer says it sent.
    async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=120) as http:
        completion = await http.post("/v1/completions", json={"prompt": prefix, "suffix": suffix, "max_tokens": 8,
                                                              "seed": 4})
        assert completion.status_code == 200, completion.text
        not_json = await http.post("/v1/completions", content=b"{nope", headers={"Content-Type": "application/json"})
        assert not_json.status_code == 400
        async with http.stream("POST", "/infill", json={"input_prefix": prefix, "input_suffix": suffix,
                                                         "n_predict": 8, "seed": 5, "stream": True}) as stream:
            assert stream.status_code == 200
            events = [json.loads(line[5:]) async for line in stream.aiter_lines() if line.startswith("data:")]
        chat = await http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                             "max_tokens": 8, "seed": 6})
        assert chat.status_code == 200, chat.text
    after_http = scrape(server)
    assert value(after_http, "dg_edit_requests_total", route="/v1/completions", outcome="ok") == 1
    assert value(after_http, "dg_edit_requests_total", route="/v1/completions", outcome="error") == 1
    assert value(after_http, "dg_edit_errors_total", route="/v1/completions", code="invalid_json") == 1
    assert value(after_http, "dg_edit_requests_total", route="/infill", outcome="ok") == 1
    assert value(after_http, "dg_edit_requests_total", route="/v1/chat/completions", outcome="ok") == 1
    for route in ("/v1/completions", "/infill", "/v1/chat/completions"):
        assert value(after_http, "dg_edit_request_seconds_count", route=route) == 1
    sent = (completion.json()["usage"]["completion_tokens"] + events[-1]["tokens_predicted"]
            + chat.json()["usage"]["completion_tokens"])
    assert sent > 0
    tokens = value(after_http, "dg_edit_generated_tokens_total") - value(after_cancel, "dg_edit_generated_tokens_total")
    assert tokens == sent
    assert value(after_http, "dg_edit_tokens_per_second") > 0
    assert value(after_http, "dg_edit_step_seconds_count") > value(after_cancel, "dg_edit_step_seconds_count")
    assert value(after_http, "dg_edit_requests_inflight") == 0
    # The HTTP routes keep one prefix-cache session per client: its bytes are counted.
    assert value(after_http, "dg_edit_cache_bytes") > 0
    assert value(after_http, "dg_edit_cache_documents") >= 1

    # 4. Next-edit over HTTP: one answered, one refused for its cursor; both on their own route.
    async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=120) as http:
        text = "def area(w, h):\n    return w * h\n\nprint(area(2, 3))\n"
        answered = await http.post("/next_edit", json={"text": text, "cursor": 10, "seed": 7})
        assert answered.status_code == 200, answered.text
        refused = await http.post("/next_edit", json={"text": text, "cursor": len(text) + 1})
        assert refused.status_code == 400, refused.text
    after_next = scrape(server)
    assert value(after_next, "dg_edit_requests_total", route="/next_edit", outcome="ok") == 1
    assert value(after_next, "dg_edit_requests_total", route="/next_edit", outcome="error") == 1
    assert value(after_next, "dg_edit_request_seconds_count", route="/next_edit") == 1
    assert value(after_next, "dg_edit_step_seconds_count") - value(after_http, "dg_edit_step_seconds_count") \
        == answered.json()["steps"]
