"""Hypothesis against the HTTP APIs of one long-lived `dg-edit serve` (the real process, the test model).

Inputs: request-shaped bodies for /v1/completions, /v1/chat/completions and /infill whose fields
take wrong types, huge numbers, NaN and infinities, long and broken Unicode, streamed or not; then
random JSON and random bytes as bodies. Invariants, for every input:
- the answer is 200 or a 4xx (400 bad field, 413 oversized), never a 5xx, and always in the
  route's own shape: OpenAI's `{"error": {"message", "type", "param", "code"}}` under /v1,
  llama.cpp's `{"error": {"code": <status>, "message", "type"}}` for /infill;
- a stream is server-sent events of JSON objects (and `[DONE]` on the OpenAI routes), ending in a
  finish (or an error object), and nothing follows `[DONE]`;
- the service answers the next request (a probe), and never logs a traceback.
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dg_edit.serve_process import ServeProcess

from fuzz_support import HYPOTHESIS as SETTINGS, any_text, examples, field_value, huge_int, json_values

pytestmark = pytest.mark.timeout(600)

ROUTES = {
    "/v1/completions": ["model", "prompt", "suffix", "max_tokens", "n", "stop", "seed", "temperature", "stream",
                        "echo", "user", "top_p", "best_of", "logprobs", "input_extra", "drafts", "single_line",
                        "stream_options"],
    "/v1/chat/completions": ["model", "messages", "max_tokens", "n", "stop", "seed", "temperature", "stream",
                             "prediction", "edit", "tools", "response_format", "input_extra", "drafts"],
    "/infill": ["input_prefix", "input_suffix", "input_extra", "prompt", "n_predict", "stream", "stop", "seed",
                "temperature", "cache_prompt", "id_slot", "response_fields", "return_tokens", "samplers", "top_k"],
    "/next_edit": ["text", "cursor", "edits", "session", "seed", "extra", "stream"],
}
SMALL = st.integers(-2, 6)  # token budgets and counts that keep model time short, and a few wrong ones
chunk = st.fixed_dictionaries({"text": any_text}, optional={"filename": any_text, "time": field_value})
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "robot"]),
                                 "content": st.one_of(any_text, st.lists(st.fixed_dictionaries(
                                     {"type": st.sampled_from(["text", "image_url"]), "text": any_text}),
                                     max_size=2), field_value)})
GOOD = {
    "prompt": st.one_of(any_text, st.lists(any_text, max_size=2)), "suffix": any_text, "input_prefix": any_text,
    "input_suffix": any_text, "max_tokens": SMALL, "n_predict": SMALL, "n": SMALL, "seed": huge_int,
    "temperature": st.floats(-1, 3), "stream": st.booleans(), "stop": st.one_of(any_text, st.lists(any_text,
                                                                                                    max_size=5)),
    "input_extra": st.lists(chunk, max_size=3), "messages": st.lists(message, max_size=3),
    "prediction": st.fixed_dictionaries({"type": st.sampled_from(["content", "text"]), "content": any_text}),
    "edit": st.fixed_dictionaries({"selection": any_text}, optional={"prefix": any_text, "strength": st.floats(-1, 2)}),
    "response_fields": st.lists(st.sampled_from(["content", "timings/predicted_n", "nope/x", ""]), max_size=3),
    "text": any_text, "cursor": SMALL, "extra": st.lists(chunk, max_size=2),
    "edits": st.lists(st.fixed_dictionaries({"start": SMALL, "end": SMALL, "text": any_text},
                                            optional={"old_text": any_text, "score": field_value}), max_size=3),
}


@st.composite
def request_shaped(draw):
    route = draw(st.sampled_from(sorted(ROUTES)))
    body = {}
    for name in draw(st.lists(st.sampled_from(ROUTES[route] + ["colour"]), max_size=7, unique=True)):
        good = GOOD.get(name)
        body[name] = draw(st.one_of(good, field_value) if good is not None else field_value)
    return route, body


@pytest.fixture(scope="module")
def service(model_dir, tmp_path_factory):
    config = tmp_path_factory.mktemp("fuzz-http") / "settings.json"
    config.write_text(json.dumps({"request_timeout_s": 20, "max_new_tokens": 8, "max_denoising_steps": 8,
                                  "max_message_bytes": 65536}))
    with ServeProcess(["--model", str(model_dir), "--config", str(config)]) as proc:
        with httpx.Client(base_url=proc.url, timeout=60) as http:
            yield http
        assert proc.proc.poll() is None, f"the service died:\n{proc.log()}"
        assert "Traceback" not in proc.log(), proc.log()


def check_error(route: str, status: int, error: object) -> None:
    assert isinstance(error, dict) and isinstance(error.get("error"), dict), error
    body = error["error"]
    assert isinstance(body["message"], str) and body["message"] and isinstance(body["type"], str)
    if route == "/infill":
        assert set(body) == {"code", "message", "type"} and body["code"] == status, error
    else:
        assert set(body) == {"message", "type", "param", "code"}, error


def post_and_check(http: httpx.Client, route: str, content: bytes) -> None:
    with http.stream("POST", route, content=content, headers={"Content-Type": "application/json"}) as response:
        status = response.status_code
        assert status in (200, 400, 413), (status, content[:300], response.read()[:500])
        if status != 200:
            check_error(route, status, json.loads(response.read()))
        elif response.headers["content-type"].startswith("text/event-stream"):
            check_stream(route, response)
        else:
            answer = json.loads(response.read())
            assert isinstance(answer, dict)
            if route == "/next_edit":
                assert isinstance(answer["edits"], list) and len(answer["window"]) == 2, answer
            elif route != "/infill":
                assert isinstance(answer["choices"], list) and answer["choices"], answer
    assert http.get("/health").json() == {"status": "ok"}  # the probe


def check_stream(route: str, response: httpx.Response) -> None:
    events = [line[5:].strip() for line in response.iter_lines() if line.startswith("data:")]
    assert events
    if route == "/infill":
        decoded = [json.loads(e) for e in events]
        assert "error" in decoded[-1] or decoded[-1]["stop"] is True, decoded[-1]
        return
    if route == "/next_edit":  # step events, then done (or an error in OpenAI's shape)
        decoded = [json.loads(e) for e in events]
        if "error" in decoded[-1]:
            check_error(route, 400, decoded[-1])
        else:
            assert isinstance(decoded[-1]["edits"], list) and all("step" in d for d in decoded[:-1]), decoded
        return
    if events[-1] != "[DONE]":  # a stream can only end without [DONE] on an error
        check_error(route, 400, json.loads(events[-1]))
        return
    assert "[DONE]" not in events[:-1]
    assert all(isinstance(json.loads(e), dict) for e in events[:-1])


@settings(max_examples=examples(150), **SETTINGS)
@given(request_shaped())
def test_request_shaped_bodies(service, fuzz_count, case):
    fuzz_count()
    route, body = case
    post_and_check(service, route, json.dumps(body).encode())  # json.dumps writes NaN/Infinity: valid for Python


@settings(max_examples=examples(40), **SETTINGS)
@given(st.sampled_from(sorted(ROUTES)), json_values)
def test_random_json_bodies(service, fuzz_count, route, value):
    fuzz_count()
    post_and_check(service, route, json.dumps(value).encode())


@settings(max_examples=examples(40), **SETTINGS)
@given(st.sampled_from(sorted(ROUTES)), st.one_of(st.binary(max_size=200), st.just(b"x" * 70_000)))
def test_random_bytes_bodies(service, fuzz_count, route, data):
    fuzz_count()
    post_and_check(service, route, data)
