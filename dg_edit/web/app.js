// dg-edit demo page: a textarea editor that asks `dg-edit serve` for an infill (or a rewrite of the
// selection) over the websocket and shows every denoising step in place, in an overlay that copies
// the textarea's metrics. Every change to the text is reported as an `edit` frame (the session's edit
// history, which aims next-edit suggestions, prepared while the user is quiet); Ctrl+Enter asks for
// the next edit and shows it struck through / inserted in place. Plain JS, no build step.
//
// Offsets: the protocol counts characters as Python does (code points); JavaScript strings count
// UTF-16 code units. `codePoints` and `unitsAt` convert at this boundary, and only here.
//
// Safety: model output is untrusted text. It only ever reaches the page through text nodes and
// `textContent`; nothing here parses HTML (the page's Content-Security-Policy forbids inline script
// anyway).
"use strict";

const $ = (id) => document.getElementById(id);
const editor = $("editor");
const preview = $("preview");
const statusLine = $("status");
const buttons = { complete: $("complete"), nextEdit: $("next-edit"), accept: $("accept"), dismiss: $("dismiss") };

// With a token, the page is opened as /?token=T; browsers cannot set headers on a websocket, so the
// token goes on the websocket URL too.
const token = new URLSearchParams(location.search).get("token");

// The document this tab edits, for a load balancer in front of several replicas: it hashes on `doc`
// (browsers cannot set the X-DG-Edit-Document header on a websocket), so every reconnect of this tab
// reaches the replica that holds its warm encoder cache. Random per tab; kept across reloads.
// (crypto.getRandomValues, not randomUUID: the latter needs a secure context, and a team's service may
// be plain http on another host.)
const documentKey = sessionStorage.getItem("dg-edit-doc")
  || `page-${Array.from(crypto.getRandomValues(new Uint8Array(8)), (b) => b.toString(16).padStart(2, "0")).join("")}`;
sessionStorage.setItem("dg-edit-doc", documentKey);

let socket = null;
let retryMs = 500;
let nextId = 1;
// The request being previewed: {id, kind, prefix, original, suffix, start, end, final}; for a next edit
// {id, kind: "next_edit", text, final, edits}.
let active = null;
// The text the service last heard the document read (through `edit` frames).
let reported = editor.value;

function withToken(path, protocol) {
  const url = new URL(path, location.href);
  if (protocol) url.protocol = protocol;
  if (token) url.searchParams.set("token", token);
  return url.href;
}

function setStatus(text, kind = "") {
  statusLine.textContent = text;
  statusLine.dataset.kind = kind;
}

function setConnection(state, detail = "") {
  const badge = $("connection");
  badge.dataset.state = state;
  badge.textContent = detail ? `${state} (${detail})` : state;
}

function connect() {
  setConnection("connecting");
  const url = new URL(withToken("/ws", location.protocol === "https:" ? "wss:" : "ws:"));
  url.searchParams.set("doc", documentKey);
  socket = new WebSocket(url.href);
  socket.addEventListener("open", () => {
    setConnection("open");
    retryMs = 500;
    reported = editor.value;  // a new connection is a new session: its history starts now
  });
  socket.addEventListener("close", (event) => {
    setConnection("closed", String(event.code));
    if (active) endPreview(`connection closed (${event.code}); reconnecting`, "error");
    setTimeout(connect, retryMs);
    retryMs = Math.min(retryMs * 2, 10000);
  });
  socket.addEventListener("message", (event) => onFrame(JSON.parse(event.data)));
}

async function showModel() {
  try {
    const response = await fetch(withToken("/healthz"));
    if (response.status === 401) {
      $("model").textContent = "this service needs a token";
      setStatus("this service needs a token: open this page as /?token=<token>", "error");
      return;
    }
    const health = await response.json();
    if (health.status === "loading") {  // the service listens while the model loads
      $("model").textContent = "the model is loading…";
      setTimeout(showModel, 2000);
      return;
    }
    $("model").textContent = `${health.model} · ${health.device} · ${health.dtype} · ${health.parameters} parameters`;
  } catch (error) {
    $("model").textContent = `model unknown (${error})`;
  }
}

// ------------------------------------------------------------------------------------------ requests
function numberField(id) {
  const value = $(id).value.trim();
  return value === "" ? undefined : Number.parseInt(value, 10);
}

function request() {
  if (!socket || socket.readyState !== WebSocket.OPEN) {
    setStatus("not connected to the service yet", "error");
    return;
  }
  if (active) dismiss();
  const text = editor.value;
  const start = editor.selectionStart;
  const end = editor.selectionEnd;
  const id = `r${nextId++}`;
  const kind = start === end ? "infill" : "rewrite";
  const frame = { type: kind, id, prefix: text.slice(0, start), suffix: text.slice(end), session: "page" };
  if (kind === "rewrite") frame.selection = text.slice(start, end);
  const seed = numberField("seed");
  if (seed !== undefined) frame.seed = seed;
  const maxNewTokens = numberField("max-new-tokens");
  if (maxNewTokens !== undefined && kind === "infill") frame.max_new_tokens = maxNewTokens;
  active = { id, kind, prefix: frame.prefix, original: text.slice(start, end), suffix: frame.suffix, start, end,
             final: null };
  socket.send(JSON.stringify(frame));
  showPreview(ghost([]));
  setStatus(`${kind} ${id}: waiting for the first step…`);
}

// ------------------------------------------------------------------------------------------ next edit
function codePoints(text) {
  let n = 0;
  for (const _ of text) n += 1; // iterates code points (a lone surrogate counts as one, as in Python)
  return n;
}

function unitsAt(text, points) {
  let units = 0;
  let n = 0;
  for (const ch of text) {
    if (n === points) break;
    units += ch.length;
    n += 1;
  }
  return units;
}

const isHigh = (code) => code >= 0xd800 && code <= 0xdbff;
const isLow = (code) => code >= 0xdc00 && code <= 0xdfff;

// Tell the service what changed since it last heard: one edit (the text both versions share at their
// ends left out, never splitting a surrogate pair), with the whole document and the cursor so that the
// next-edit suggestion there is prepared while the user is quiet.
function reportEdit() {
  const text = editor.value;
  if (text === reported || !socket || socket.readyState !== WebSocket.OPEN) return;
  const old = reported;
  const n = Math.min(text.length, old.length);
  let a = 0;
  while (a < n && text[a] === old[a]) a += 1;
  let b = 0;
  while (b < n - a && text[text.length - 1 - b] === old[old.length - 1 - b]) b += 1;
  if (a > 0 && isHigh(old.charCodeAt(a - 1))) a -= 1;
  if (b > 0 && isLow(old.charCodeAt(old.length - b))) b -= 1;
  const oldText = old.slice(a, old.length - b);
  const start = codePoints(old.slice(0, a));
  socket.send(JSON.stringify({
    type: "edit", id: `e${nextId++}`, session: "page", start, end: start + codePoints(oldText),
    text: text.slice(a, text.length - b), old_text: oldText, document: text,
    cursor: codePoints(text.slice(0, editor.selectionEnd)),
  }));
  reported = text;
}

function requestNextEdit() {
  if (!socket || socket.readyState !== WebSocket.OPEN) {
    setStatus("not connected to the service yet", "error");
    return;
  }
  if (active) dismiss();
  reportEdit();
  const text = editor.value;
  const id = `n${nextId++}`;
  const frame = { type: "next_edit", id, text, cursor: codePoints(text.slice(0, editor.selectionEnd)), session: "page" };
  const seed = numberField("seed");
  if (seed !== undefined) frame.seed = seed;
  active = { id, kind: "next_edit", text, final: null, edits: null };
  socket.send(JSON.stringify(frame));
  setStatus(`next edit ${id}: waiting for the first step…`);
  buttons.dismiss.disabled = false;
}

// The suggestion in place: each edit's old text struck through, its new text inserted after it.
function showNextEdit(frame) {
  const text = active.text;
  const nodes = [];
  let at = 0;
  for (const edit of frame.edits) {
    const start = unitsAt(text, edit.start);
    const end = unitsAt(text, edit.end);
    if (start > at) nodes.push(document.createTextNode(text.slice(at, start)));
    if (end > start) {
      const old = document.createElement("span");
      old.className = "ne-old";
      old.textContent = text.slice(start, end);
      nodes.push(old);
    }
    if (edit.text) {
      const added = document.createElement("span");
      added.className = "ne-new";
      added.title = `confidence ${edit.score.toFixed(3)}`;
      added.textContent = edit.text;
      nodes.push(added);
    }
    at = end;
  }
  nodes.push(document.createTextNode(text.slice(at)));
  preview.replaceChildren(...nodes);
  preview.hidden = false;
  preview.scrollTop = editor.scrollTop;
  preview.scrollLeft = editor.scrollLeft;
}

function acceptNextEdit() {
  const { text, edits } = active;
  if (editor.value !== text) {
    endPreview("the text changed while the model was working; request again", "error");
    return;
  }
  // Last edit first, so earlier offsets still hold; each is reported as the user's own edit.
  let caret = null;
  for (const edit of [...edits].reverse()) {
    const start = unitsAt(text, edit.start);
    editor.setRangeText(edit.text, start, unitsAt(text, edit.end), "end");
    if (caret === null) caret = start + edit.text.length;
    else caret += edit.text.length - (unitsAt(text, edit.end) - start);
    reportEdit();
  }
  editor.setSelectionRange(caret, caret);
  endPreview(`accepted ${edits.length} edit${edits.length === 1 ? "" : "s"}`);
  editor.focus();
}

function cancelActive() {
  if (active && active.final === null && socket && socket.readyState === WebSocket.OPEN) {
    socket.send(JSON.stringify({ type: "cancel", id: active.id }));
  }
}

// ------------------------------------------------------------------------------------------ frames
function onFrame(frame) {
  if (frame.type === "error" && frame.id === null) {
    setStatus(`error (${frame.code}): ${frame.message}`, "error");
    return;
  }
  if (!active || frame.id !== active.id) return; // a dismissed request's late frames
  switch (frame.type) {
    case "step":
      if (active.kind === "next_edit") {  // the window's draft: progress only, the edits come with done
        setStatus(`next edit ${frame.id}: step ${frame.step}/${frame.total} · ${frame.ms.toFixed(1)} ms`);
        break;
      }
      showPreview(ghost(draftNodes(frame), frame.step));
      setStatus(`${active.kind} ${frame.id}: step ${frame.step}/${frame.total} · ${frame.ms.toFixed(1)} ms`);
      break;
    case "done": {
      if (active.kind === "next_edit") {
        const how = frame.prepared ? "prepared while you paused" : `${frame.steps} steps · ${frame.ms.toFixed(1)} ms`;
        if (frame.edits.length === 0) {
          endPreview(`no edit suggested (${how}): the model keeps the text around the cursor`, "done");
          break;
        }
        active.final = frame.text;
        active.edits = frame.edits;
        showNextEdit(frame);
        const n = frame.edits.length;
        setStatus(`next edit ${frame.id}: ${n} edit${n === 1 ? "" : "s"} (${how}): Tab accepts, Esc dismisses`,
                  "done");
        buttons.accept.disabled = false;
        break;
      }
      active.final = frame.text;
      const span = ghost([document.createTextNode(frame.text)]);
      span.classList.add("final");
      showPreview(span);
      const how = frame.typed_ahead ? "typed ahead, the rest of the last answer"
        : `${frame.steps} steps · ${frame.tokens_per_forward} tokens/forward · ${frame.ms.toFixed(1)} ms`;
      setStatus(`done ${frame.id}: ${how}: Tab accepts, Esc dismisses`, "done");
      buttons.accept.disabled = false;
      break;
    }
    case "cancelled":
      endPreview(`cancelled ${frame.id}`);
      break;
    case "error":
      endPreview(`error (${frame.code}): ${frame.message}`, "error");
      break;
  }
}

// The step's tokens are the current canvas block; `text` is the whole draft (earlier blocks included,
// possibly cut at a newline). Tokens decoded one by one can differ from the joint decoding where a
// character spans two tokens, so match tokens against the end of the text, last first: matched tokens
// are shaded by confidence, the rest of the text is shown plain.
function draftNodes(frame) {
  const joined = frame.tokens.map((t) => t.text).join("");
  if (joined.length > frame.text.length && joined.startsWith(frame.text)) {
    return tokenSpans(frame.tokens, frame.text.length); // the draft was cut at a newline
  }
  let end = frame.text.length;
  let first = frame.tokens.length;
  while (first > 0 && frame.text.slice(0, end).endsWith(frame.tokens[first - 1].text)) {
    end -= frame.tokens[first - 1].text.length;
    first -= 1;
  }
  const head = frame.text.slice(0, end);
  return [...(head ? [document.createTextNode(head)] : []), ...tokenSpans(frame.tokens.slice(first), Infinity)];
}

function tokenSpans(tokens, limit) {
  const spans = [];
  let used = 0;
  for (const tok of tokens) {
    if (used >= limit) break;
    const text = tok.text.slice(0, limit - used);
    used += text.length;
    const span = document.createElement("span");
    span.className = `tok c${Math.min(4, Math.floor(tok.confidence * 5))}${tok.accepted ? " accepted" : ""}`;
    span.title = `confidence ${tok.confidence.toFixed(3)}${tok.accepted ? ", accepted this step" : ""}`;
    span.textContent = text;
    spans.push(span);
  }
  return spans;
}

function ghost(children, step) {
  const span = document.createElement("span");
  span.id = "ghost";
  span.className = "ghost";
  if (step !== undefined) span.dataset.step = String(step);
  span.append(...children);
  return span;
}

// ------------------------------------------------------------------------------------------ preview
function showPreview(ghostSpan) {
  preview.replaceChildren(document.createTextNode(active.prefix), ghostSpan, document.createTextNode(active.suffix));
  preview.hidden = false;
  preview.scrollTop = editor.scrollTop;
  preview.scrollLeft = editor.scrollLeft;
  buttons.dismiss.disabled = false;
}

function endPreview(message, kind = "") {
  active = null;
  preview.hidden = true;
  preview.replaceChildren();
  buttons.accept.disabled = true;
  buttons.dismiss.disabled = true;
  if (message !== undefined) setStatus(message, kind);
}

function dismiss() {
  if (!active) return;
  cancelActive();
  endPreview("dismissed");
}

function accept() {
  if (!active || active.final === null) return;
  if (active.kind === "next_edit") {
    acceptNextEdit();
    return;
  }
  if (editor.value !== active.prefix + active.original + active.suffix) {
    endPreview("the text changed while the model was working; request again", "error");
    return;
  }
  const { start, end, final } = active;
  editor.setRangeText(final, start, end, "end");
  reportEdit();
  endPreview(`accepted ${final.length} characters`);
  editor.focus();
}

// ------------------------------------------------------------------------------------------ keys
editor.addEventListener("keydown", (event) => {
  if (event.key === " " && event.ctrlKey) {
    event.preventDefault();
    request();
    return;
  }
  if (event.key === "Enter" && event.ctrlKey) {
    event.preventDefault();
    requestNextEdit();
    return;
  }
  if (!active) {
    if (event.key === "Tab" && !event.shiftKey && !event.ctrlKey && !event.altKey) {
      event.preventDefault();
      editor.setRangeText("    ", editor.selectionStart, editor.selectionEnd, "end");
      reportEdit();
    }
    return;
  }
  if (event.key === "Tab") {
    event.preventDefault();
    if (active.final !== null) accept();
    else setStatus("still refining: Tab accepts once the draft is done");
    return;
  }
  if (event.key === "Escape") {
    event.preventDefault();
    dismiss();
    return;
  }
  if (!["Shift", "Control", "Alt", "Meta", "CapsLock"].includes(event.key)) dismiss(); // the draft is stale
});
editor.addEventListener("input", reportEdit);
editor.addEventListener("scroll", () => {
  preview.scrollTop = editor.scrollTop;
  preview.scrollLeft = editor.scrollLeft;
});
buttons.complete.addEventListener("click", () => { request(); editor.focus(); });
buttons.nextEdit.addEventListener("click", () => { requestNextEdit(); editor.focus(); });
buttons.accept.addEventListener("click", accept);
buttons.dismiss.addEventListener("click", () => { dismiss(); editor.focus(); });

// Start with the cursor after "return " so Ctrl+Space right away shows something sensible.
const demoCursor = editor.value.indexOf("return ") + "return ".length;
editor.setSelectionRange(demoCursor, demoCursor);
editor.focus();
showModel();
connect();
