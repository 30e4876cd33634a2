"""Next-edit prediction in the core: edits, histories, the window, the engine's requests, preparation."""

from __future__ import annotations

import random
import time

import pytest

from dg_edit.config import Settings
from dg_edit.edits import EditHistory, TextEdit, apply_edits, diff_edits, merge
from dg_edit.events import Done, Step
from dg_edit.next_edit import choose_window, edits_from_rewrite, history_chunk, repeat_last_edit

SOURCE = '''def mean(values):
    count = 0
    acc = 0.0
    for v in values:
        acc += v
        count += 1
    return acc / count


def main():
    print(mean([1, 2, 3]))
'''


def keystrokes(text: str, start: int, old: str, new: str) -> list[TextEdit]:
    """What an editor reports for selecting nothing, backspacing `old` (which ends at start+len(old))
    and typing `new`: one delta per key, each indexing the text as it was just before it."""
    out = []
    end = start + len(old)
    for i in range(len(old)):
        at = end - i - 1
        out.append(TextEdit(at, at + 1, "", old[len(old) - i - 1]))
    for i, ch in enumerate(new):
        out.append(TextEdit(start + i, start + i, ch, ""))
    return out


# ---------------------------------------------------------------- edits and histories
def test_keystrokes_join_into_one_rename():
    i = SOURCE.index("count = 0")
    history = EditHistory()
    text = SOURCE
    for key in keystrokes(SOURCE, i, "count", "total"):
        text = key.apply(text)
        history.record(key)
    assert history.recent() == (TextEdit(i, i + 5, "total", "count"),)
    assert history.recent()[0].apply(SOURCE) == text


def test_random_edit_sequences_merge_to_what_they_did():
    rng = random.Random(3)
    for _ in range(300):
        before = "".join(rng.choice("ab \n") for _ in range(rng.randint(0, 12)))
        text = before
        history = EditHistory(max_edits=1000, max_chars=10**6)
        applied = []
        for _ in range(rng.randint(1, 6)):
            a = rng.randint(0, len(text))
            b = rng.randint(a, min(len(text), a + 3))
            edit = TextEdit(a, b, "".join(rng.choice("xy") for _ in range(rng.randint(0, 3))), text[a:b])
            text = edit.apply(text)
            applied.append(edit)
            history.record(edit)
        # Replaying the history, each edit on the text before it, gives the same text.
        replay = before
        for edit in history.recent():
            assert replay[edit.start: edit.end] == edit.old_text
            replay = edit.apply(replay)
        assert replay == text, (before, applied, history.recent())


def test_history_is_bounded_in_edits_and_characters():
    history = EditHistory(max_edits=3, max_chars=50)
    for k in range(10):
        history.record(TextEdit(k * 100, k * 100 + 1, "y", "x"))  # far apart: never joined
    assert [e.start for e in history.recent()] == [700, 800, 900]
    history.record(TextEdit(5000, 5000, "z" * 200, ""))
    assert len(history) == 1 and sum(len(e.text) for e in history.recent()) <= 50
    v = history.version
    history.record(TextEdit(3, 4, "q", "q"))  # changes nothing
    assert history.version == v


def test_diff_edits_are_minimal_and_apply():
    old = "a = count + count\nb = count\n"
    new = "a = total + total\nb = total\n"
    edits = diff_edits(old, new, offset=10)
    assert [(e.start - 10, e.old_text, e.text) for e in edits] == [(4, "count", "total"), (12, "count", "total"),
                                                                  (22, "count", "total")]
    assert apply_edits("#" * 10 + old, edits) == "#" * 10 + new
    rng = random.Random(1)
    for _ in range(200):
        a = "".join(rng.choice(["foo", "bar", " ", "\n", "(", ")", "x1"]) for _ in range(rng.randint(0, 10)))
        b = "".join(rng.choice(["foo", "bar", " ", "\n", "(", ")", "x1"]) for _ in range(rng.randint(0, 10)))
        assert apply_edits(a, diff_edits(a, b)) == b
    assert diff_edits(old, old) == []


def test_text_edit_checks_and_wire_shape():
    edit = TextEdit(1, 3, "new", "ol", score=0.123456)
    assert edit.to_json() == {"start": 1, "end": 3, "text": "new", "old_text": "ol", "score": 0.1235}
    assert TextEdit.from_json(edit.to_json()) == TextEdit(1, 3, "new", "ol", score=0.1235)
    for bad in ({"start": 2, "end": 1, "text": ""}, {"start": -1, "end": 1, "text": ""},
                {"start": 0, "end": 1}, {"start": 0, "end": 1, "text": 3}, {"start": 0, "end": 1, "text": "", "x": 1},
                {"start": True, "end": 1, "text": ""}):
        with pytest.raises(ValueError):
            TextEdit.from_json(bad)
    assert merge(TextEdit(0, 0, "ab"), TextEdit(10, 10, "c")) is None


# ---------------------------------------------------------------- the window and the prompt
def test_window_is_whole_lines_around_the_cursor_mostly_below():
    count = len  # one "token" per character
    lines = [f"line {k:02d}\n" for k in range(30)]  # 8 characters each
    text = "".join(lines)
    cursor = text.index("line 10") + 3
    w = choose_window(text, cursor, count, budget=8 * 9)
    assert text[w.start: w.end].startswith("line 08") and text[w.start: w.end].endswith("line 16\n")
    assert w.start <= cursor < w.end and count(text[w.start: w.end]) <= 72
    # The cursor's line goes in even when it alone is over budget; the end of the text is a line too.
    assert choose_window("abc", 3, count, budget=1) == type(w)(0, 3)
    with pytest.raises(ValueError):
        choose_window(text, len(text) + 1, count, budget=10)


def test_history_chunk_shows_whole_lines_before_and_after():
    i = SOURCE.index("count = 0")
    text = SOURCE[:i] + "total" + SOURCE[i + 5:]
    chunk = history_chunk(text, [TextEdit(i, i + 5, "total", "count")])
    assert chunk.endswith("-    count = 0\n+    total = 0\n")
    # An edit later overwritten shows its own text only.
    assert "-count\n+totl\n" in history_chunk(text, [TextEdit(i, i + 5, "totl", "count")])
    assert history_chunk(text, []) == ""


def test_repeat_last_edit_baseline():
    i = SOURCE.index("count = 0")
    text = SOURCE[:i] + "total" + SOURCE[i + 5:]
    (edit,) = repeat_last_edit(text, i + 5, [TextEdit(i, i + 5, "total", "count")])
    assert text[edit.start: edit.end] == "count" and edit.text == "total"
    assert edit.start == text.index("count += 1")
    assert repeat_last_edit(text, 0, []) == ()
    assert repeat_last_edit(text, 0, [TextEdit(0, 0, "x", "")]) == ()


def test_edits_from_rewrite_scores_and_drops_a_cut_tail():
    window = "a = count\nb = count\n"
    step = Step(index=1, total=1, text="", tokens=())
    same = edits_from_rewrite(window, window, 100, step, 0.0)
    assert same == ()
    edits = edits_from_rewrite(window, "a = count\nb = total\n", 100, step, 0.0)
    assert [(e.start, e.end, e.text) for e in edits] == [(114, 119, "total")]
    # The canvas ran out (EOS) before the last line: not a suggestion to delete it.
    assert edits_from_rewrite(window, "a = count\n", 100, step, 0.0) == ()
    assert edits_from_rewrite(window, "a = count\nb = total\n", 100, step, 0.5) == ()  # score 0 < 0.5


# ---------------------------------------------------------------- the engine, real model
def _renamed():
    i = SOURCE.index("count = 0")
    return i, SOURCE[:i] + "total" + SOURCE[i + 5:]


def test_next_edit_streams_steps_then_edits_inside_the_window(engine):
    i, text = _renamed()
    session = "next-edit-stream"
    for key in keystrokes(SOURCE, i, "count", "total"):
        engine.record_edit(session, key)
    assert engine.recent_edits(session) == (TextEdit(i, i + 5, "total", "count"),)
    events = list(engine.stream_next_edit(text, i + 5, session=session))
    steps, done = events[:-1], events[-1]
    assert isinstance(done, Done) and steps and all(isinstance(s, Step) for s in steps)
    start, end = done.window
    assert start <= i + 5 <= end and text[start:].startswith("def mean")
    # The edits are the rewrite: applied to the text, they give prefix + rewrite + suffix.
    assert apply_edits(text, done.edits) == text[:start] + done.text + text[end:]
    for e in done.edits:
        assert start <= e.start <= e.end <= end and text[e.start: e.end] == e.old_text and 0 <= e.score <= 1
    wire = done.to_json()
    assert wire["window"] == [start, end] and len(wire["edits"]) == len(done.edits)
    assert steps[-1].text == done.text
    # Reproducible: seed None is seed 0.
    again = engine.next_edit(text, i + 5, session=session, seed=0)
    assert again.edits == done.edits
    engine.forget(session)
    assert engine.recent_edits(session) == ()


def test_prepared_next_edit_answers_at_once_and_only_for_its_request(model_dir):
    from dg_edit import Engine

    engine = Engine.load(str(model_dir), settings=Settings(idle_prefill_ms=0))
    i, text = _renamed()
    engine.record_edit("doc", TextEdit(i, i + 5, "total", "count"))
    cold = engine.next_edit(text, i + 5, session="doc")
    engine.prepare_next_edit("doc", text, i + 5)
    assert engine.wait_next_edit_prepared(60)
    t0 = time.perf_counter()
    warm = engine.next_edit(text, i + 5, session="doc")
    took = time.perf_counter() - t0
    assert warm.prepared and not cold.prepared and took < 0.05
    assert warm.edits == cold.edits and warm.text == cold.text and warm.to_json()["prepared"] is True
    # Another cursor, or a new edit, is not what was prepared.
    engine.prepare_next_edit("doc", text, i + 5)
    assert engine.wait_next_edit_prepared(60)
    assert not engine.next_edit(text, i + 4, session="doc").prepared
    engine.record_edit("doc", TextEdit(0, 0, "#\n", ""))
    assert not engine.next_edit(text, i + 5, session="doc").prepared
    engine.close()


def test_next_edit_rejects_bad_input(engine):
    for kwargs in ({"text": 3, "cursor": 0}, {"text": "abc", "cursor": 4}, {"text": "abc", "cursor": -1},
                   {"text": "abc", "cursor": True}, {"text": "abc", "cursor": 1, "sampling": {"nope": 1}},
                   {"text": "abc", "cursor": 1, "sampling": [1]}):
        with pytest.raises(ValueError):
            list(engine.stream_next_edit(**kwargs, session="bad"))
    with pytest.raises(ValueError):
        engine.record_edit("bad", "not an edit")
    # An empty document: nothing to rewrite, no suggestion, no model call.
    done = engine.next_edit("", 0)
    assert done.edits == () and done.steps == 0 and done.window == (0, 0)


def test_an_edit_that_is_not_unicode_text_is_refused_and_changes_nothing():
    from dg_edit.serve.runner import record_edit

    class Recorder:
        def __init__(self):
            self.calls = []

        def record_edit(self, session, edit):
            self.calls.append(("record", session, edit))

        def prefill(self, session, text):
            self.calls.append(("prefill", session))

        def prepare_next_edit(self, session, text, cursor):
            self.calls.append(("prepare", session, cursor))

    with pytest.raises(ValueError, match="UTF-8"):
        TextEdit(0, 0, "\ud800")
    engine = Recorder()
    for document, cursor in (("a\udfffb", 1), ("ab", 3), ("ab", None)):
        with pytest.raises(ValueError):
            record_edit(engine, "s", TextEdit(0, 0, "x"), document, cursor)
    assert engine.calls == []
    record_edit(engine, "s", TextEdit(0, 0, "x"), "xab", 1)
    assert [c[0] for c in engine.calls] == ["record", "prefill", "prepare"]


def test_preparation_waits_while_a_request_runs(model_dir):
    from dg_edit import Engine

    engine = Engine.load(str(model_dir), settings=Settings(idle_prefill_ms=0))
    i, text = _renamed()
    engine.record_edit("doc", TextEdit(i, i + 5, "total", "count"))
    events = engine.stream(text[:i], text[i:], seed=1, max_new_tokens=8)
    next(events)  # a request is running (its first step done, the rest to come)
    engine.prepare_next_edit("doc", text, i + 5)
    time.sleep(0.5)
    state = engine.cache_info()["next_edit"]
    assert state["pending"] == 1 and state["running"] is None and state["ready"] == 0, state
    for _ in events:  # the request ends: now the editor is quiet
        pass
    assert engine.wait_next_edit_prepared(60)
    assert engine.cache_info()["next_edit"]["ready"] == 1
    assert engine.next_edit(text, i + 5, session="doc").prepared
    engine.close()
