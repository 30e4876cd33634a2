"""The websocket protocol without a model: the parser agrees with the JSON Schema in the repo, server
frames are built from the core's events and validate, and the outbox coalesces drafts for a slow
reader without ever dropping a final frame."""

from __future__ import annotations

import asyncio
import json
from importlib import resources

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dg_edit import Done, Error, Step, Token
from dg_edit.serve import protocol
from dg_edit.serve.outbox import Outbox, OutboxFull
from dg_edit.edits import TextEdit
from dg_edit.serve.protocol import (CancelRequest, EditMessage, InfillRequest, NextEditRequest, ProtocolError,
                                    RewriteRequest)


@pytest.fixture(scope="module")
def schema():
    text = (resources.files("dg_edit") / "schema" / "protocol.schema.json").read_text(encoding="utf-8")
    schema = json.loads(text)
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


def validator(schema, name):
    return jsonschema.Draft202012Validator({**schema, "$ref": f"#/$defs/{name}"})


def test_parse_typed_requests():
    r = protocol.parse_request(json.dumps({"type": "infill", "id": "r1", "prefix": "a", "suffix": "b",
                                           "max_new_tokens": 8, "seed": 3, "session": "doc"}))
    assert r == InfillRequest(id="r1", prefix="a", suffix="b", max_new_tokens=8, seed=3, session="doc")
    r = protocol.parse_request(json.dumps({"type": "rewrite", "id": "r2", "prefix": "p", "selection": "s",
                                           "suffix": "x", "instruction": "shorter", "strength": 1}))
    assert r == RewriteRequest(id="r2", prefix="p", selection="s", suffix="x", instruction="shorter", strength=1)
    assert protocol.parse_request('{"type":"cancel","id":"r1"}') == CancelRequest(id="r1")
    r = protocol.parse_request(json.dumps({"type": "infill", "id": "r3", "prefix": "a", "extra": [
        {"text": "X = 1", "filename": "lib/x.py"}, {"text": "Y = 2\n"}]}))
    assert r.extra == ("# file: lib/x.py\nX = 1\n", "Y = 2\n")  # as dg_edit.extra.extra_chunk writes them
    r = protocol.parse_request(json.dumps({"type": "next_edit", "id": "n1", "text": "ab\n", "cursor": 2,
                                           "session": "doc", "seed": 1}))
    assert r == NextEditRequest(id="n1", text="ab\n", cursor=2, seed=1, session="doc")
    r = protocol.parse_request(json.dumps({"type": "edit", "id": "e1", "session": "doc", "start": 1, "end": 2,
                                           "text": "x", "old_text": "b", "document": "axc", "cursor": 2}))
    assert r == EditMessage(id="e1", session="doc", start=1, end=2, text="x", old_text="b", document="axc", cursor=2)


@pytest.mark.parametrize("frame, code, rid, words", [
    ("{not json", "bad_request", None, "not JSON"),
    (b'{"type":"cancel","id":"r1"}', "bad_request", None, "binary"),
    ("[1, 2]", "bad_request", None, "JSON object"),
    ('{"type":"infill","prefix":"x"}', "bad_request", None, "id"),
    ('{"type":"infill","id":7,"prefix":"x"}', "bad_request", None, "id"),
    ('{"type":"infill","id":"","prefix":"x"}', "bad_request", None, "id"),
    ('{"type":"paint","id":"r1"}', "bad_request", "r1", "unknown request type"),
    ('{"id":"r1","prefix":"x"}', "bad_request", "r1", "unknown request type"),
    ('{"type":"infill","id":"r1"}', "bad_request", "r1", "prefix"),
    ('{"type":"infill","id":"r1","prefix":3}', "bad_request", "r1", "prefix must be a string"),
    ('{"type":"infill","id":"r1","prefix":"x","seed":"7"}', "bad_request", "r1", "seed must be an integer"),
    ('{"type":"infill","id":"r1","prefix":"x","seed":1.5}', "bad_request", "r1", "seed must be an integer"),
    ('{"type":"infill","id":"r1","prefix":"x","max_new_tokens":true}', "bad_request", "r1", "max_new_tokens"),
    ('{"type":"infill","id":"r1","prefix":"x","max_new_tokens":0}', "bad_request", "r1", "positive"),
    ('{"type":"infill","id":"r1","prefix":"x","max_new_token":5}', "bad_request", "r1", "unknown field"),
    ('{"type":"rewrite","id":"r1","prefix":"x"}', "bad_request", "r1", "selection"),
    ('{"type":"rewrite","id":"r1","prefix":"x","selection":"y","strength":2}', "bad_request", "r1", "[0, 1]"),
    ('{"type":"rewrite","id":"r1","prefix":"x","selection":"y","strength":NaN}', "bad_request", "r1", "[0, 1]"),
    ('{"type":"cancel","id":"r1","prefix":"x"}', "bad_request", "r1", "unknown field"),
    ('{"type":"infill","id":"r1","prefix":"x","extra":"text"}', "bad_request", "r1", "extra must be an array"),
    ('{"type":"infill","id":"r1","prefix":"x","extra":[{"text":1}]}', "bad_request", "r1", "extra[0] must be"),
    ('{"type":"rewrite","id":"r1","prefix":"x","selection":"y","extra":[{"text":"a","filename":2}]}',
     "bad_request", "r1", "extra[0].filename"),
    ('{"type":"infill","id":"r1","prefix":"x","extra":[{"text":"a","time":1}]}', "bad_request", "r1",
     "unknown field(s) in extra[0]"),
    ('{"type":"next_edit","id":"r1","text":"x"}', "bad_request", "r1", "cursor"),
    ('{"type":"next_edit","id":"r1","text":"x","cursor":-1}', "bad_request", "r1", ">= 0"),
    ('{"type":"next_edit","id":"r1","text":"x","cursor":0.5}', "bad_request", "r1", "cursor must be an integer"),
    ('{"type":"edit","id":"r1","session":"d","start":0,"end":1}', "bad_request", "r1", "text"),
    ('{"type":"edit","id":"r1","session":"d","start":0,"end":1,"text":"","cursor":1}', "bad_request", "r1",
     "document and cursor"),
])
def test_bad_frames_are_protocol_errors(frame, code, rid, words):
    with pytest.raises(ProtocolError) as info:
        protocol.parse_request(frame)
    assert info.value.code == code
    assert info.value.request_id == rid
    assert words in info.value.message


# Field values that exercise every type check: right and wrong types, bounds, NaN-free JSON.
_values = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(-1, 2, allow_nan=False),
                    st.text(max_size=3), st.lists(st.integers(), max_size=1))
_keys = st.sampled_from(["type", "id", "prefix", "suffix", "selection", "instruction", "strength", "seed",
                         "max_new_tokens", "session", "single_line", "extra", "text", "cursor", "start", "end",
                         "old_text", "document"])
_frames = st.dictionaries(_keys, _values, max_size=8).map(
    lambda d: d | {"type": d.get("type") if not isinstance(d.get("type"), str) else d["type"]})
_typed = st.builds(lambda d, kind, rid: {**d, "type": kind, "id": rid}, _frames,
                   st.sampled_from(["infill", "rewrite", "next_edit", "edit", "cancel", "paint"]), st.sampled_from(["r1", "", 5]))


@settings(max_examples=400, deadline=None)
@given(st.one_of(_frames, _typed))
def test_parser_accepts_exactly_what_the_schema_accepts(schema, frame):
    """The schema is the documentation; the parser is the truth. They must not drift apart."""
    by_schema = validator(schema, "ClientFrame").is_valid(frame)
    try:
        protocol.parse_request(json.dumps(frame))
        by_parser = True
    except ProtocolError:
        by_parser = False
    assert by_parser == by_schema, frame


def test_server_frames_come_from_core_events_and_validate(schema):
    server = validator(schema, "ServerFrame")
    step = Step(index=2, total=8, text="ab", tokens=(Token("a", True, 0.9), Token("b", False, 0.2)), ms=3.25)
    frames = [
        protocol.event_frame(step, "r1"),
        protocol.event_frame(Done(text="ab", ids=(1, 2), steps=8, tokens_per_forward=0.25, ms=9.0), "r1"),
        protocol.event_frame(Done(text="a = y\n", ids=(1,), steps=3, tokens_per_forward=1.0, window=(4, 10),
                                  edits=(TextEdit(8, 9, "y", "x", score=0.5),), prepared=True), "r1"),
        protocol.event_frame(Done(text="a\n", ids=(), steps=0, tokens_per_forward=0.0, window=(0, 2)), "r1"),
        protocol.event_frame(Error("model_error", "boom"), "r1"),
        protocol.error_frame("bad_request", "not JSON", None),
        protocol.cancelled_frame("r1"),
    ]
    for frame in frames:
        server.validate(json.loads(frame))
    first = json.loads(frames[0])
    assert first == {"type": "step", "id": "r1", **{k: v for k, v in step.to_json().items() if k != "type"}}
    for code in protocol.ERROR_CODES:
        server.validate(json.loads(protocol.error_frame(code, "m", "r1")))
    with pytest.raises(jsonschema.ValidationError):
        server.validate(json.loads(protocol.error_frame("no_such_code", "m", "r1")))


def test_frames_are_ascii_json_even_for_broken_unicode():
    frame = protocol.event_frame(Done(text="\ud800 \u00e9 \ufffd", ids=(), steps=1, tokens_per_forward=1.0), "r")
    frame.encode("ascii")
    assert json.loads(frame)["text"] == "\ud800 \u00e9 \ufffd"


async def test_outbox_coalesces_steps_and_keeps_finals_in_order():
    box = Outbox(max_finals=3)
    for i in range(1, 6):
        box.put_step("a", f"a{i}")
    box.put_step("b", "b1")
    box.put_final("a-done")
    box.put_step("b", "b2")
    got = [await box.get() for _ in range(len(box))]
    assert got == ["a5", "b2", "a-done"]  # the latest draft of each request, then the final, in order
    assert box.coalesced == 5
    box.put_step("b", "b3")  # a draft after its slot was sent takes a new place in line
    box.put_final("b-done")
    assert [await box.get(), await box.get()] == ["b3", "b-done"]
    # A reader that waits is woken by the next frame.
    waiter = asyncio.create_task(box.get())
    await asyncio.sleep(0)
    assert not waiter.done()
    box.put_final("x")
    assert await asyncio.wait_for(waiter, 1) == "x"


async def test_outbox_drop_steps_and_bounded_finals():
    box = Outbox(max_finals=2)
    box.put_step("a", "a1")
    box.put_final("f1")
    box.drop_steps("a")
    box.drop_steps("never")
    box.put_final("f2")
    with pytest.raises(OutboxFull):
        box.put_final("f3")
    assert [await box.get(), await box.get()] == ["f1", "f2"]
    box.put_final("f3")  # room again once the client read
    assert await box.get() == "f3"
