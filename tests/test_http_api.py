"""`dg-edit serve`'s HTTP APIs driven by the clients editor tools use: the official `openai` SDK
against /v1/completions and /v1/chat/completions, and an HTTP client sending llama.cpp's /infill
exactly as its server README documents it (and as llama.vim sends it). Real service processes, the
test model; the websocket protocol is the reference: the same request, seed and settings give the
same text over every API.

Nothing here asserts what the model writes, only how the service behaves.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from dg_edit.faults import MARKER
from dg_edit.serve_process import ServeGroup, ServeProcess

pytestmark = pytest.mark.timeout(300)

TOKEN = "http-s3cret"
ALLOWED = "http://tools.example:3000"
# As tests/test_service.py: every canvas block runs exactly 8 steps, whatever the model proposes.
STEADY = {"sampling": {"max_denoising_steps": 8, "confidence_threshold": 1e-30, "stability_threshold": 8}}
FIM = ("def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n")
BLOCK = ("import os\n\ndef list_files(path):\n", "\n")


@pytest.fixture(scope="module")
def servers(model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("http-api")
    steady = folder / "steady.json"
    steady.write_text(json.dumps({**STEADY, "max_message_bytes": 65536}))
    model = ["--model", str(model_dir), "--config", str(steady)]
    group = ServeGroup(
        plain=ServeProcess(model),
        auth=ServeProcess([*model, "--allow-origin", ALLOWED], env={"DG_EDIT_TOKEN": TOKEN}),
        # every step of a request whose prompt holds the fault marker sleeps 0.3 s
        slow=ServeProcess(model, env={"DG_EDIT_FAULT": "slow:0.3"}),
    )
    with group:
        yield group
    assert group.codes == {name: 0 for name in group}, {name: group[name].log()[-2000:] for name in group}
    assert not any("Traceback" in proc.log() for proc in group.values()), group["plain"].log()[-3000:]


@pytest.fixture(scope="module")
def server(servers):
    return servers["plain"]


def sdk(server, api_key: str = "unused", **kwargs) -> openai.OpenAI:
    """The OpenAI SDK pointed at the service, as an editor tool configures it (no retries: a test
    wants to see each status once)."""
    return openai.OpenAI(base_url=server.url + "/v1", api_key=api_key, max_retries=0, timeout=120, **kwargs)


def health(server) -> dict:
    return httpx.get(server.url + "/healthz", timeout=30).json()


def canvas(server) -> int:
    return health(server)["canvas_length"]


async def ws_done(server, request: dict) -> dict:
    """The websocket protocol's final frame for `request` (the reference answer)."""
    async with connect(server.ws_url, max_size=None) as ws:
        await ws.send(json.dumps({"id": "ref", **request}))
        while True:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 120))
            if frame["type"] != "step":
                assert frame["type"] == "done", frame
                return frame


def sse(response: httpx.Response) -> list[tuple[str | None, str]]:
    """Server-sent events as (event name, data) pairs."""
    events, name, data = [], None, []
    for line in response.iter_lines():
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
        elif line == "" and data:
            events.append((name, "\n".join(data)))
            name, data = None, []
    return events


# ---------------------------------------------------------------------------------------------- OpenAI SDK
async def test_completion_with_a_suffix_is_the_websocket_infill(server):
    prefix, suffix = FIM
    result = await asyncio.to_thread(sdk(server).completions.create, model="default", prompt=prefix, suffix=suffix,
                                     max_tokens=24, seed=5)
    assert result.object == "text_completion" and len(result.choices) == 1
    choice = result.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.index == 0
    assert result.usage.completion_tokens > 0 and result.usage.prompt_tokens > 0
    # The HTTP routes keep one prefix-cache session per client: the websocket twin uses a session too.
    reference = await ws_done(server, {"type": "infill", "prefix": prefix, "suffix": suffix, "max_new_tokens": 24,
                                       "seed": 5, "session": "doc"})
    assert choice.text == reference["text"]


async def test_n_choices_are_the_requests_with_consecutive_seeds(server):
    prefix, suffix = BLOCK
    client = sdk(server)
    result = await asyncio.to_thread(client.completions.create, model="default", prompt=prefix, suffix=suffix,
                                     max_tokens=16, seed=11, n=3)
    assert [c.index for c in result.choices] == [0, 1, 2]
    for j, choice in enumerate(result.choices):
        single = await asyncio.to_thread(client.completions.create, model="default", prompt=prefix, suffix=suffix,
                                         max_tokens=16, seed=11 + j)
        assert choice.text == single.choices[0].text
    assert result.usage.completion_tokens >= sum(1 for c in result.choices if c.text)


async def test_streaming_appends_committed_text_and_ends_like_the_whole_answer(server):
    """Deltas only ever append; together they are the non-streamed answer; each choice ends with a
    finish_reason chunk, then usage, then [DONE] (the SDK stops there)."""
    prefix = "import os\n\n"
    budget = 3 * canvas(server)  # several canvas blocks: text is committed block by block
    client = sdk(server)
    whole = await asyncio.to_thread(client.completions.create, model="default", prompt=prefix, max_tokens=budget,
                                    seed=3, n=2)

    def stream() -> list:
        return list(client.completions.create(model="default", prompt=prefix, max_tokens=budget, seed=3, n=2,
                                              stream=True, stream_options={"include_usage": True}))

    chunks = await asyncio.to_thread(stream)
    texts, finished = {0: "", 1: ""}, {}
    for chunk in chunks[:-1]:
        for choice in chunk.choices:
            assert choice.index not in finished, "text after the finish chunk"
            texts[choice.index] += choice.text
            if choice.finish_reason is not None:
                finished[choice.index] = choice.finish_reason
    assert texts == {c.index: c.text for c in whole.choices}
    assert finished == {c.index: c.finish_reason for c in whole.choices}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_raw_stream_commits_whole_blocks_and_sends_drafts_only_when_asked(server):
    """What goes over the wire: `data:` chunks and `data: [DONE]`; with "drafts": true, also
    `event: draft` events with each step's whole draft. A multi-block answer arrives in several
    deltas, each of whole lines but the last."""
    body = {"model": "default", "prompt": "import os\n\n", "max_tokens": 4 * canvas(server), "seed": 7,
            "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        plain = sse(response)
    assert all(name is None for name, _ in plain) and plain[-1][1] == "[DONE]"
    deltas = [json.loads(d)["choices"][0]["text"] for _, d in plain[:-1]]
    assert all(d.endswith("\n") for d in deltas[:-2])  # committed blocks: whole lines
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "drafts": True}, timeout=120) as response:
        events = sse(response)
    drafts = [json.loads(d) for name, d in events if name == "draft"]
    assert drafts and all(set(d) == {"index", "step", "total", "text"} for d in drafts)
    assert [d["step"] for d in drafts] == sorted(d["step"] for d in drafts)
    assert [json.loads(d)["choices"][0]["text"] for name, d in events if name is None and d != "[DONE]"] == deltas
    if len({d["total"] for d in drafts}) > 2:  # three blocks or more: text was committed before the end
        assert sum(1 for d in deltas if d) >= 2, deltas


async def test_stop_strings_cut_the_answer(server):
    client = sdk(server)
    whole = await asyncio.to_thread(client.completions.create, model="default", prompt="import os\n\n",
                                    max_tokens=40, seed=2)
    text = whole.choices[0].text
    if len(text) < 3:
        pytest.skip(f"the model wrote too little to cut: {text!r}")
    stop = text[1:3]
    cut = await asyncio.to_thread(client.completions.create, model="default", prompt="import os\n\n", max_tokens=40,
                                  seed=2, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_errors_come_in_openai_shape_with_the_right_status(servers):
    plain, auth = servers["plain"], servers["auth"]
    client = sdk(plain)
    for kwargs, param in [(dict(n=0), "n"), (dict(temperature=3), "temperature"), (dict(logprobs=2), "logprobs"),
                          (dict(seed=-1), "seed"), (dict(extra_body={"colour": "red"}), "colour")]:
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model="default", prompt="x = ", max_tokens=4, **kwargs)
        error = info.value.body
        assert info.value.status_code == 400 and error["param"] == param, error
        assert error["type"] == "invalid_request_error" and error["message"]
    # The engine refusing the input is a 400 as well, before any text is sent, streaming or not.
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError, match="both empty"):
            client.completions.create(model="default", prompt="", max_tokens=4, stream=stream)
    # The token is the SDK's api_key.
    with pytest.raises(openai.AuthenticationError) as info:
        sdk(auth, api_key="wrong").completions.create(model="default", prompt="x = ", max_tokens=2)
    assert info.value.body["code"] == "invalid_api_key"
    assert sdk(auth, api_key=TOKEN).completions.create(model="default", prompt="x = ", max_tokens=2).choices
    # A web page of another origin may not drive the model; an allowed one may (and gets CORS headers).
    with pytest.raises(openai.PermissionDeniedError):
        sdk(plain, default_headers={"Origin": "http://evil.example"}).completions.create(
            model="default", prompt="x = ", max_tokens=2)
    preflight = httpx.options(auth.url + "/v1/completions", headers={
        "Origin": ALLOWED, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == ALLOWED
    # An oversized body: 413 (this server's max_message_bytes is 64 KiB).
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(model="default", prompt="x" * 70_000, max_tokens=2)
    assert info.value.status_code == 413 and info.value.body["code"] == "body_too_large"
    # A field name the client wrote with a lone surrogate (JSON "\udfff") is quoted back as an escape:
    # a 400 in OpenAI's shape, not a 500 from a message that cannot be encoded (found by the fuzz test).
    for route in ("/v1/completions", "/v1/chat/completions"):
        body = '{"model": "default", "prompt": "x", "messages": [], "a\\udfffb": 1}'
        response = httpx.post(plain.url + route, content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 400, response.text
        assert "a\\udfffb" in response.json()["error"]["message"]
    # Routes and methods the service does not have.
    assert httpx.get(plain.url + "/v1/completions").status_code == 405
    assert httpx.post(plain.url + "/v1/embeddings", json={}).status_code == 404


async def test_busy_is_429_and_the_service_goes_on(server):
    prefix, suffix = BLOCK
    body = {"model": "default", "prompt": prefix, "max_tokens": 4 * canvas(server), "seed": 1, "n": 4,
            "stream": True}
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
        async with http.stream("POST", "/v1/completions", json=body) as first:  # max_inflight=4 streams
            assert first.status_code == 200
            with pytest.raises(openai.RateLimitError) as info:
                await asyncio.to_thread(sdk(server).completions.create, model="default", prompt="x = ", max_tokens=2)
            assert info.value.body["code"] == "busy" and "max_inflight" in info.value.body["message"]
            assert info.value.response.headers["retry-after"] == "1"
        # Closing the stream cancelled its four streams: the next request is served.
        for _ in range(100):
            if health(server)["inflight"] == 0:
                break
            await asyncio.sleep(0.1)
        assert (await http.post("/v1/completions", json={"prompt": "x = ", "max_tokens": 2})).status_code == 200


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_disconnects_cancels_its_denoising(servers, stream):
    """The slow server sleeps 0.3 s in every step of this request: whole, it would run ~10 s; after the
    client goes, its engine stream must stop before its next step or two."""
    slow = servers["slow"]
    body = {"prompt": f"# {MARKER}\nimport os\n\n", "max_tokens": 4 * canvas(slow), "stream": stream}
    done = threading.Event()

    def request() -> None:
        try:
            with httpx.Client(timeout=httpx.Timeout(60, read=1.5)) as http:
                with http.stream("POST", slow.url + "/v1/completions", json=body) as response:
                    for _ in response.iter_raw():
                        pass
        except httpx.ReadTimeout:  # nothing for 1.5 s: give up, closing the connection
            pass
        finally:
            done.set()

    thread = threading.Thread(target=request)
    thread.start()
    assert done.wait(60)
    gone = time.monotonic()
    while health(slow)["inflight"] > 0:
        assert time.monotonic() - gone < 2.0, "the engine kept denoising for a client that left"
        time.sleep(0.05)
    thread.join()


async def test_chat_prediction_is_an_instructed_rewrite(server):
    code = "def area(r):\n    return 3.14 * r * r\n"
    client = sdk(server)
    result = await asyncio.to_thread(
        client.chat.completions.create, model="default", seed=4,
        messages=[{"role": "system", "content": "You edit code."}, {"role": "user", "content": "use math.pi"}],
        prediction={"type": "content", "content": code})
    message = result.choices[0].message
    assert result.object == "chat.completion" and message.role == "assistant"
    reference = await ws_done(server, {"type": "rewrite", "prefix": "", "selection": code, "suffix": "",
                                       "instruction": "use math.pi", "seed": 4, "session": "doc"})
    assert message.content == reference["text"]
    # The extension `edit` carries the code with its context, and streams like any chat.
    edit = {"selection": "x = 1\n", "prefix": "import math\n", "suffix": "print(x)\n", "strength": 1.0}
    whole = await asyncio.to_thread(client.chat.completions.create, model="default", seed=6, extra_body={"edit": edit},
                                    messages=[{"role": "user", "content": "rename x to y"}])
    chunks = await asyncio.to_thread(lambda: list(client.chat.completions.create(
        model="default", seed=6, extra_body={"edit": edit}, stream=True,
        messages=[{"role": "user", "content": "rename x to y"}])))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_chat_without_code_is_a_plain_generation(server):
    result = await asyncio.to_thread(sdk(server).chat.completions.create, model="default", max_tokens=12, seed=1,
                                     messages=[{"role": "user", "content": "Write a loop in Python."}])
    assert isinstance(result.choices[0].message.content, str)
    assert result.choices[0].finish_reason in ("stop", "length")
    assert result.usage.completion_tokens <= 12
    with pytest.raises(openai.BadRequestError, match="tools"):
        sdk(server).chat.completions.create(model="default", messages=[{"role": "user", "content": "hi"}],
                                            tools=[{"type": "function", "function": {"name": "f"}}])


def test_models_lists_the_one_model(server):
    models = sdk(server).models.list()
    assert [m.id for m in models.data] == ["default"] and models.data[0].owned_by == "dg-edit"


# ---------------------------------------------------------------------------------------------- llama.cpp /infill
EXTRA = [{"filename": "lib/consts.py", "text": "RATE = 0.2\nLIMIT = 10\n"},
         {"filename": "lib/util.py", "text": "def clamp(x, lo, hi):\n    return max(lo, min(x, hi))\n"}]


async def test_infill_as_the_llama_cpp_readme_documents_it(server):
    body = {"input_prefix": "def total(values):\n", "input_suffix": "\n    return s\n", "input_extra": EXTRA,
            "prompt": "    s = ", "n_predict": 24, "seed": 9}
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
        response = await http.post("/infill", json=body)
        assert response.status_code == 200
        answer = response.json()
        assert isinstance(answer["content"], str) and answer["stop"] is True
        assert answer["stop_type"] in ("eos", "limit", "word") and answer["model"] == "default"
        assert answer["tokens_predicted"] == answer["timings"]["predicted_n"]
        # `prompt` continues the prefix, the chunks of other files go ahead of it: the websocket twin
        # with the same text, chunks and seed writes the same middle.
        reference = await ws_done(server, {"type": "infill", "prefix": body["input_prefix"] + body["prompt"],
                                           "suffix": body["input_suffix"], "extra": EXTRA, "max_new_tokens": 24,
                                           "seed": 9, "session": "doc"})
        assert answer["content"] == reference["text"]
        # Streamed: data events of new text, the last with stop: true and the final fields; no [DONE].
        async with http.stream("POST", "/infill", json={**body, "stream": True}) as streamed:
            lines = [line async for line in streamed.aiter_lines() if line.startswith("data:")]
        events = [json.loads(line[5:]) for line in lines]
        assert all(e["stop"] is False for e in events[:-1]) and events[-1]["stop"] is True
        assert "".join(e["content"] for e in events) == answer["content"]
        assert events[-1]["stop_type"] == answer["stop_type"]


def test_infill_as_llama_vim_sends_it(server):
    """llama.vim's own request bodies (autoload/llama.vim): the warm-up that sends only the ring of
    chunks, then a completion with its sampler fields and its response_fields list."""
    warmup = {"input_prefix": "", "input_suffix": "", "input_extra": [{**c, "time": [1, 2]} for c in EXTRA],
              "prompt": "", "n_predict": 0, "temperature": 0.0, "stream": False, "samplers": [],
              "cache_prompt": True, "t_max_prompt_ms": 1, "t_max_predict_ms": 1, "response_fields": [""]}
    response = httpx.post(server.url + "/infill", json=warmup, timeout=60)
    assert response.status_code == 200 and response.json() == {}
    fields = ["content", "timings/prompt_n", "timings/predicted_n", "timings/predicted_ms",
              "timings/predicted_per_second", "truncated", "tokens_cached"]
    fim = {"input_prefix": "import os\n\n", "input_suffix": "\n", "input_extra": warmup["input_extra"],
           "prompt": "def main", "n_predict": 32, "n_indent": 0, "top_k": 40, "top_p": 0.99, "stream": False,
           "samplers": ["top_k", "top_p", "infill"], "cache_prompt": True, "t_max_prompt_ms": 500,
           "t_max_predict_ms": 1500, "response_fields": fields}
    answer = httpx.post(server.url + "/infill", json=fim, timeout=120).json()
    assert isinstance(answer["content"], str) and answer["truncated"] is False
    assert answer["timings/predicted_n"] >= 0 and answer["timings/prompt_n"] > 0
    assert "tokens_cached" not in answer  # the engine does not report it: left out, not made up
    assert set(answer) <= set(fields)


def test_infill_errors_come_in_llama_cpp_shape(servers):
    plain, auth = servers["plain"], servers["auth"]
    response = httpx.post(plain.url + "/infill", json={"input_prefix": 3}, timeout=30)
    assert response.status_code == 400
    assert response.json() == {"error": {"code": 400, "message": "input_prefix must be a string, got 3",
                                         "type": "invalid_request_error"}}
    assert httpx.post(plain.url + "/infill", content=b"{nope", timeout=30).json()["error"]["code"] == 400
    response = httpx.post(auth.url + "/infill", json={"input_prefix": "x = "}, timeout=30)
    assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
    response = httpx.post(auth.url + "/infill", json={"input_prefix": "x = ", "n_predict": 2}, timeout=60,
                          headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200
    # As llama.cpp's, /health is public.
    assert httpx.get(auth.url + "/health").json() == {"status": "ok"}
    assert httpx.get(auth.url + "/healthz").status_code == 401


# ---------------------------------------------------------------------------------------------- while loading
async def test_every_route_answers_503_while_the_model_loads(engine):
    """The service listens before the model is loaded (`dg-edit serve` prints "bound to" first): until
    then each API says so in its own shape, the websocket handshake too; then everything serves."""
    from dg_edit.serve.app import Service

    service = Service(None, engine.settings, host="127.0.0.1", port=0)
    async with service:
        host, port = service.address
        base = f"http://{host}:{port}"
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            response = await http.post("/v1/completions", json={"prompt": "x = "})
            assert response.status_code == 503 and response.headers["retry-after"] == "5"
            assert response.json()["error"]["code"] == "model_loading"
            response = await http.post("/infill", json={"input_prefix": "x = "})
            assert response.status_code == 503 and response.json()["error"]["type"] == "unavailable_error"
            assert (await http.get("/health")).json() == {
                "error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}
            assert (await http.get("/healthz")).json()["status"] == "loading"
            with pytest.raises(InvalidStatus) as info:
                async with connect(f"ws://{host}:{port}/ws"):
                    pass
            assert info.value.response.status_code == 503
            service.set_engine(engine)
            assert (await http.get("/health")).json() == {"status": "ok"}
            response = await http.post("/v1/completions", json={"prompt": "x = ", "max_tokens": 2})
            assert response.status_code == 200 and response.json()["choices"][0]["finish_reason"]


# ---------------------------------------------------------------------------------------------- next edit
NEXT_EDIT_TEXT = "def mean(values):\n    total = 0\n    acc = 0.0\n    for v in values:\n        acc += v\n" \
                 "        count += 1\n    return acc / count\n"


def test_next_edit_route_answers_the_engines_edits_whole_or_streamed(servers, engine):
    from dg_edit.edits import TextEdit

    plain, auth = servers["plain"], servers["auth"]
    at = NEXT_EDIT_TEXT.index("total")
    body = {"text": NEXT_EDIT_TEXT, "cursor": at + 5, "edits": [{"start": at, "end": at + 5, "text": "total",
                                                                 "old_text": "count"}], "session": "m.py"}
    expected = engine.next_edit(NEXT_EDIT_TEXT, at + 5, sampling=STEADY["sampling"],
                                edits=[TextEdit(at, at + 5, "total", "count")])
    response = httpx.post(plain.url + "/next_edit", json=body, timeout=120)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["window"] == list(expected.window) and answer["text"] == expected.text and answer["steps"] > 0
    assert [(e["start"], e["end"], e["text"]) for e in answer["edits"]] == [(e.start, e.end, e.text)
                                                                           for e in expected.edits]
    # Streamed: the window's drafts as `step` events, then the same answer as `done`.
    with httpx.stream("POST", plain.url + "/next_edit", json={**body, "stream": True}, timeout=120) as streamed:
        assert streamed.status_code == 200 and streamed.headers["content-type"].startswith("text/event-stream")
        events = [block for block in streamed.read().decode().split("\n\n") if block]
    names = [block.split("\n")[0] for block in events]
    assert names[-1] == "event: done" and names[:-1] and set(names[:-1]) == {"event: step"}
    last = json.loads(events[-1].split("data: ", 1)[1])
    assert last["edits"] == answer["edits"] and last["text"] == answer["text"]
    # Bad input is a 400 naming the field; the token is required where the service has one.
    for bad, param in [({"text": "x"}, "cursor"), ({"text": "x", "cursor": 2}, "cursor"),
                       ({"text": "x", "cursor": 0, "edits": [{"start": 1}]}, "edits"),
                       ({"text": "x", "cursor": 0, "colour": 1}, "colour"), ({"text": 3, "cursor": 0}, "text")]:
        response = httpx.post(plain.url + "/next_edit", json=bad, timeout=30)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, (bad, response.text)
    assert httpx.get(plain.url + "/next_edit").status_code == 405
    assert httpx.post(auth.url + "/next_edit", json=body, timeout=30).status_code == 401
    response = httpx.post(auth.url + "/next_edit", json=body, timeout=120,
                          headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200 and response.json()["window"] == answer["window"]
