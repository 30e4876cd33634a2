"""Hypothesis against one long-lived `dg-edit serve` (the real process, the test model).

Inputs: random binary frames, random text frames, random JSON, and request-shaped objects whose
fields take wrong types, huge numbers, long and broken Unicode; then raw garbage on the socket,
before and after the websocket handshake. Invariants, for every input:
- the answer is what the JSON Schema says it should be: schema-valid requests run (and end in
  `done`/`cancelled`, or `bad_request` when the engine refuses the text), anything else gets exactly
  one `bad_request` (or `unknown_id`) error frame carrying the request id when there was a valid one;
  every server frame validates against the schema; never `model_error` for any input;
- the connection answers the next frame (a probe), and the service answers a real infill at the end;
- the service never logs a traceback.
"""

from __future__ import annotations

import json
import os
import socket
from importlib import resources

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from dg_edit.serve_process import ServeProcess

from fuzz_support import HYPOTHESIS as SETTINGS, any_text, examples, field_value, huge_int, json_values

pytestmark = pytest.mark.timeout(600)

FINAL = {"done", "cancelled", "error"}


def _schema_validators():
    schema = json.loads((resources.files("dg_edit") / "schema" / "protocol.schema.json").read_text("utf-8"))
    return (jsonschema.Draft202012Validator({**schema, "$ref": "#/$defs/ClientFrame"}),
            jsonschema.Draft202012Validator({**schema, "$ref": "#/$defs/ServerFrame"}))


CLIENT_FRAME, SERVER_FRAME = _schema_validators()


@pytest.fixture(scope="module")
def service(model_dir, tmp_path_factory):
    config = tmp_path_factory.mktemp("fuzz-ws") / "settings.json"
    config.write_text(json.dumps({"request_timeout_s": 20}))
    with ServeProcess(["--model", str(model_dir), "--config", str(config)]) as proc:
        yield proc
        assert proc.proc.poll() is None, f"the service died:\n{proc.log()}"
        assert "Traceback" not in proc.log(), proc.log()


class Session:
    """One websocket connection that checks every frame it receives against the schema."""

    def __init__(self, service):
        self.service = service
        self.ws = connect(service.ws_url, max_size=None, open_timeout=30).__enter__()
        self.probes = 0

    def recv(self, timeout: float = 60) -> dict:
        frame = json.loads(self.ws.recv(timeout=timeout))
        SERVER_FRAME.validate(frame)
        return frame

    def probe(self) -> None:
        """The connection still answers: a cancel for an id nobody used gets `unknown_id`."""
        self.probes += 1
        rid = f"probe-{self.probes}"
        self.ws.send(json.dumps({"type": "cancel", "id": rid}))
        frame = self.recv()
        assert (frame["type"], frame["id"], frame["code"]) == ("error", rid, "unknown_id"), frame

    def probe_after(self, rid: str | None) -> None:
        """A probe, accepting at most one `bad_request` error for `rid` before its answer."""
        self.probes += 1
        probe = f"probe-{self.probes}"
        self.ws.send(json.dumps({"type": "cancel", "id": probe}))
        frame = self.recv()
        if frame["id"] != probe:
            assert (frame["type"], frame["id"], frame["code"]) == ("error", rid, "bad_request"), frame
            frame = self.recv()
        assert (frame["type"], frame["id"], frame["code"]) == ("error", probe, "unknown_id"), frame

    def reopen_if_closed(self) -> None:
        try:
            self.ws.ping().wait(10)
        except ConnectionClosed:
            self.ws = connect(self.service.ws_url, max_size=None, open_timeout=30).__enter__()


@pytest.fixture(scope="module")
def session(service):
    s = Session(service)
    yield s
    s.ws.close()


def valid_id(frame) -> str | None:
    rid = frame.get("id") if isinstance(frame, dict) else None
    return rid if isinstance(rid, str) and 0 < len(rid) <= 128 else None


def send_and_check(session: Session, raw: str | bytes) -> None:
    """Send one frame; check the answer against the schema's verdict; then probe the connection."""
    try:
        frame = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        frame = None
    is_request = frame is not None and CLIENT_FRAME.is_valid(frame) and frame["type"] not in ("cancel", "edit")
    session.ws.send(raw)
    rid = valid_id(frame)
    if frame is not None and CLIENT_FRAME.is_valid(frame) and frame["type"] == "edit":
        # An edit is recorded without an answer, or refused (bad_request with its id: end before start,
        # text that is not valid Unicode, a cursor past the document); the probe's answer comes next.
        session.probe_after(rid)
        return
    if is_request:
        # The request runs (that is what is being tested); to keep model time bounded it is cancelled
        # at its first draft. It ends in exactly one final frame: done, cancelled, or a refusal
        # (bad_request: e.g. text that is not valid Unicode). A cancel that crossed the final frame
        # gets unknown_id.
        cancelled = False
        finals = []
        while True:
            reply = session.recv()
            assert reply["id"] == rid, reply
            if reply["type"] == "step" and not cancelled:
                session.ws.send(json.dumps({"type": "cancel", "id": rid}))
                cancelled = True
            elif reply["type"] in FINAL:
                if reply["type"] == "error" and reply["code"] == "unknown_id":
                    assert cancelled and finals, reply
                    break
                assert not finals, f"two final frames for one request: {finals[0]} then {reply}"
                finals.append(reply)
                if reply["type"] == "error":
                    assert reply["code"] in ("bad_request", "timeout"), (frame, reply)
                if not cancelled or reply["type"] == "cancelled":
                    break
                # We cancelled, but the request had finished: the cancel gets unknown_id next.
    else:
        reply = session.recv()
        assert reply["type"] == "error", (raw, reply)
        expected = "unknown_id" if frame is not None and CLIENT_FRAME.is_valid(frame) else "bad_request"
        assert reply["code"] == expected, (raw, reply)
        if isinstance(frame, dict):
            assert reply["id"] == rid, (raw, reply)
        else:
            assert reply["id"] is None, (raw, reply)
        assert reply["message"]
    session.probe()


# ---------------------------------------------------------------------------------------------- strategies
FIELDS = ["prefix", "suffix", "selection", "instruction", "strength", "seed", "max_new_tokens", "session",
          "single_line", "text", "cursor", "start", "end", "old_text", "document"]


@st.composite
def request_shaped(draw):
    """A request object: right type and id, each field present or not, of the right type or not."""
    kind = draw(st.sampled_from(["infill", "rewrite", "next_edit", "edit", "cancel", "INFILL", "", "rewrite "]))
    frame = {"type": kind, "id": draw(st.one_of(st.text(min_size=1, max_size=12), any_text, huge_int))}
    for name in draw(st.lists(st.sampled_from(FIELDS + ["extra", "type"]), max_size=6, unique=True)):
        good = {"prefix": any_text, "suffix": any_text, "selection": any_text, "instruction": any_text,
                "session": any_text, "strength": st.floats(0, 1), "seed": huge_int,
                "max_new_tokens": huge_int, "single_line": st.booleans(), "text": any_text, "old_text": any_text,
                "document": any_text, "cursor": st.integers(0, 40), "start": st.integers(0, 40),
                "end": st.integers(0, 40)}.get(name)
        frame[name] = draw(st.one_of(good, field_value) if good is not None else field_value)
    if draw(st.booleans()) and kind in ("infill", "rewrite"):
        frame.setdefault("prefix", draw(any_text))
        if kind == "rewrite":
            frame.setdefault("selection", draw(any_text))
    if draw(st.booleans()) and kind in ("next_edit", "edit"):
        frame.setdefault("text", draw(any_text))
        frame.setdefault("cursor" if kind == "next_edit" else "start", draw(st.integers(0, 40)))
        if kind == "edit":
            frame.setdefault("session", draw(any_text))
            frame.setdefault("end", draw(st.integers(0, 40)))
    return frame


# ---------------------------------------------------------------------------------------------- tests
HANDSHAKE = (b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")

@settings(max_examples=examples(40), **SETTINGS)
@given(st.binary(max_size=300))
def test_random_binary_frames(session, fuzz_count, data):
    fuzz_count()
    send_and_check(session, data)


@settings(max_examples=examples(60), **SETTINGS)
@given(st.one_of(st.text(max_size=200), st.text(st.characters(codec="utf-8"), max_size=200)))
def test_random_text_frames(session, fuzz_count, text):
    fuzz_count()
    send_and_check(session, text)


@settings(max_examples=examples(60), **SETTINGS)
@given(json_values)
def test_random_json(session, fuzz_count, value):
    fuzz_count()
    send_and_check(session, json.dumps(value))


@settings(max_examples=examples(150), **SETTINGS)
@given(request_shaped())
def test_request_shaped_frames_with_wrong_types_and_huge_values(session, fuzz_count, frame):
    fuzz_count()
    send_and_check(session, json.dumps(frame))


@settings(max_examples=examples(60), **SETTINGS)
@given(st.binary(min_size=1, max_size=200), st.booleans())
def test_raw_socket_garbage(service, session, fuzz_count, data, after_handshake):
    """Bytes that are not HTTP, or not websocket framing after a good handshake: the connection is
    closed (HTTP 400 / close 1002) and the service goes on."""
    fuzz_count()
    with socket.create_connection((service.host, service.port), timeout=30) as raw:
        if after_handshake:
            raw.sendall(HANDSHAKE % service.port)
            response = b""
            while b"\r\n\r\n" not in response:
                chunk = raw.recv(4096)
                assert chunk, "the service closed during a valid handshake"
                response += chunk
            assert response.startswith(b"HTTP/1.1 101"), response
            raw.sendall(data)
        else:
            raw.sendall(data + b"\r\n\r\n")
        raw.shutdown(socket.SHUT_WR)  # end of stream after the garbage: nothing may wait for more
        while raw.recv(4096):  # the service answers (400, a close frame, an error frame) and closes
            pass
    session.reopen_if_closed()
    session.probe()


def test_the_service_still_answers_a_real_infill(session):
    """Runs after the fuzz tests in this module: the same connection is served correctly."""
    session.ws.send(json.dumps({"type": "infill", "id": "final", "prefix": "def add(a, b):\n    return ",
                                "suffix": "\n", "seed": 1}))
    frames = []
    while not frames or frames[-1]["type"] not in FINAL:
        frames.append(session.recv(timeout=120))
    assert frames[-1]["type"] == "done", frames[-1]
    assert all(f["id"] == "final" for f in frames)
