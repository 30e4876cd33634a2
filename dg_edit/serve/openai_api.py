"""OpenAI's `/v1/completions` and `/v1/chat/completions`, as Continue, minuet-ai.nvim, Tabby and the
OpenAI SDKs call them, answered by the diffusion engine.

Completions: `prompt` is the text before the cursor and `suffix` the text after it (the
fill-in-the-middle form); without a suffix it is a plain continuation. `max_tokens` defaults to
`Settings.max_new_tokens` (not OpenAI's 16), `n` choices run as `n` engine streams with seeds
`seed`, `seed + 1`, ... (at most `Settings.max_inflight`), `stop` cuts the answer, `echo` puts the
prompt in front of it, `temperature` scales the model's own t_max -> t_min schedule (1 keeps it; see
`http_api.temperature_sampling`). `top_p`, `presence_penalty` and `frequency_penalty` have no
counterpart in the diffusion sampler: they are accepted and have no effect. `logprobs`, `logit_bias`
and `best_of` other than their neutral values are refused with a 400, as are fields OpenAI does not
define (dg-edit's extensions aside).

Chat: when the request carries code to edit, the last user message is the instruction of a rewrite
of that code, in place between its context, and the answer is the rewritten code. The code comes
either in OpenAI's own `prediction` field (`{"type": "content", "content": CODE}`: "this is the
text to change") or in the extension `edit` (`{"selection": CODE, "prefix": TEXT BEFORE, "suffix":
TEXT AFTER, "strength": 0.6}`). Otherwise the conversation, written with the model's chat template
(or as "role: text" lines when it has none), is continued as a plain generation.

dg-edit extensions on both routes: `input_extra` (llama.cpp's chunks of other files), `drafts`
(stream every step's whole draft as `event: draft`), `single_line` (completions: force or forbid a
one-line answer; default: decided by the cursor's line).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Sequence

from .errors import ApiError
from .http_api import Call, Fields, Outcome, Usage, bad_value, now, temperature_sampling
from .protocol import ProtocolError, parse_extra
from .runner import Job

if TYPE_CHECKING:
    from .app import Service

# Accepted and without effect: sampling knobs of autoregressive samplers (OpenAI's, and the ones
# OpenAI-compatible servers add, which clients such as Continue send).
NO_EFFECT = ("top_p", "presence_penalty", "frequency_penalty", "top_k", "min_p", "repetition_penalty")
EXTENSIONS = ("input_extra", "drafts")
COMPLETION_FIELDS = ("model", "prompt", "suffix", "max_tokens", "n", "stop", "seed", "temperature", "stream",
                     "stream_options", "echo", "best_of", "logprobs", "logit_bias", "user", "single_line",
                     *NO_EFFECT, *EXTENSIONS)
CHAT_FIELDS = ("model", "messages", "max_tokens", "max_completion_tokens", "n", "stop", "seed", "temperature",
               "stream", "stream_options", "user", "logprobs", "top_logprobs", "logit_bias", "prediction",
               "response_format", "tools", "tool_choice", "parallel_tool_calls", "metadata", "store",
               "service_tier", "edit", *NO_EFFECT, *EXTENSIONS)
ROLES = ("system", "developer", "user", "assistant", "tool")


# ---------------------------------------------------------------------------------------------- parsing
def parse_completion(data: Any, service: "Service", client: str) -> Call:
    body = _fields(data, COMPLETION_FIELDS, "/v1/completions")
    prompts = _prompts(body)
    suffix = body.get("suffix", (str,), "")
    max_tokens = _max_tokens(body, "max_tokens")
    n = _n(body, service)
    _neutral(body, n)
    stream, include_usage = _stream(body)
    echo = body.get("echo", (bool,), False)
    single_line = body.get("single_line", (bool,), None)
    common = _common(body, service, client, n)
    jobs = [Job("infill", prompt, suffix, max_new_tokens=max_tokens, seed=_seed(common.seed, j),
                session=common.session, single_line=single_line, extra=common.extra, sampling=common.sampling)
            for prompt in prompts for j in range(n)]
    fmt = CompletionFormat(service.model_id, include_usage,
                           echo=[prompt for prompt in prompts for _ in range(n)] if echo else None)
    return Call(jobs, fmt, stream=stream, stop=common.stop, drafts=common.drafts, max_new_tokens=max_tokens,
                prompt_texts=(*prompts, suffix))


def parse_chat(data: Any, service: "Service", client: str) -> Call:
    body = _fields(data, CHAT_FIELDS, "/v1/chat/completions")
    messages = _messages(body)
    max_tokens = _max_tokens(body, "max_completion_tokens") or _max_tokens(body, "max_tokens")
    n = _n(body, service)
    _neutral(body, n)
    if body.get("tools", (list,), []) or body.get("tool_choice", (str, dict), None) not in (None, "none"):
        raise ApiError(HTTPStatus.BAD_REQUEST, "tools are not supported by this model server", "unsupported",
                       param="tools")
    response_format = body.get("response_format", (dict,), None)
    if response_format is not None and response_format.get("type") != "text":
        raise ApiError(HTTPStatus.BAD_REQUEST, 'only response_format {"type": "text"} is supported', "unsupported",
                       param="response_format")
    stream, include_usage = _stream(body)
    common = _common(body, service, client, n)
    edit = _edit(body)
    if edit is not None:
        instruction = next((m.text for m in reversed(messages) if m.role == "user"), None)
        if not instruction:
            raise bad_value("messages", "an edit needs a user message: its text is the instruction")
        jobs = [Job("rewrite", edit.prefix, edit.suffix, selection=edit.selection, instruction=instruction,
                    strength=edit.strength, seed=_seed(common.seed, j), session=common.session, extra=common.extra,
                    sampling=common.sampling) for j in range(n)]
        texts: tuple[str, ...] = (edit.prefix, edit.selection, edit.suffix, instruction)
    else:
        prompt = chat_prompt(service.engine, messages)
        jobs = [Job("infill", prompt, "", max_new_tokens=max_tokens, seed=_seed(common.seed, j),
                    session=common.session, single_line=False, extra=common.extra, sampling=common.sampling)
                for j in range(n)]
        texts = (prompt,)
    return Call(jobs, ChatFormat(service.model_id, include_usage), stream=stream, stop=common.stop,
                drafts=common.drafts, max_new_tokens=max_tokens if edit is None else None, prompt_texts=texts)


@dataclass
class _Common:
    seed: int | None
    session: str | None
    stop: tuple[str, ...]
    drafts: bool
    extra: tuple[str, ...]
    sampling: dict = field(default_factory=dict)


@dataclass
class _Message:
    role: str
    text: str


@dataclass
class _Edit:
    selection: str
    prefix: str = ""
    suffix: str = ""
    strength: float = 0.6


def _fields(data: Any, known: Sequence[str], route: str) -> Fields:
    body = Fields(data)
    unknown = body.unknown(known)
    if unknown:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"unrecognized request argument(s) for {route}: {', '.join(unknown)}; "
                                               f"accepted: {', '.join(known)}", "unknown_parameter", param=unknown[0])
    return body


def _common(body: Fields, service: "Service", client: str, n: int) -> _Common:
    body.get("model", (str,), None)  # one model is served: any name is accepted, but it is a name
    seed = body.get("seed", (int,), None)
    if seed is not None and not (0 <= seed and seed + n - 1 < 2 ** 64):
        raise bad_value("seed", f"seed must be an integer in [0, 2**64 - n), got {seed}")
    temperature = body.get("temperature", (int, float), None)
    if temperature is not None and not 0 <= temperature <= 2:
        raise bad_value("temperature", f"temperature must be between 0 and 2, got {temperature}")
    user = body.get("user", (str,), "")
    extra = body.get("input_extra", (list,), [])
    try:
        chunks = parse_extra(extra, field="input_extra", other_keys=True)
    except ProtocolError as e:
        raise bad_value("input_extra", e.message) from None
    # One prefix-cache entry per client address and `user`: consecutive requests of one editor share
    # their prefix, so only what changed is encoded again.
    return _Common(seed=seed, session=f"http:{client}:{user}", stop=body.strings("stop", max_items=4),
                   drafts=body.get("drafts", (bool,), False), extra=chunks,
                   sampling=temperature_sampling(service.engine, temperature))


def _prompts(body: Fields) -> list[str]:
    prompt = body.data.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, (int, list)) for p in prompt):
        raise bad_value("prompt", "token-id prompts are not supported: send the prompt as text")
    raise bad_value("prompt", f"prompt must be a string or a non-empty array of strings, got "
                              f"{type(prompt).__name__ if prompt is not None else 'nothing'}")


def _max_tokens(body: Fields, name: str) -> int | None:
    value = body.get(name, (int,), None)
    if value is not None and value < 1:  # the engine refuses too many (dg_edit.engine.MAX_NEW_TOKENS)
        raise bad_value(name, f"{name} must be at least 1, got {value}")
    return value


def _n(body: Fields, service: "Service") -> int:
    n = body.get("n", (int,), 1)
    limit = service.settings.max_inflight
    if not 1 <= n <= limit:
        raise bad_value("n", f"n must be between 1 and {limit} (each choice is one engine stream; "
                             f"Settings.max_inflight={limit}), got {n}")
    return n


def _neutral(body: Fields, n: int) -> None:
    """Refuse what the diffusion sampler cannot do, unless asked for at its neutral value."""
    best_of = body.get("best_of", (int,), None)
    if best_of is not None and best_of != n:
        raise ApiError(HTTPStatus.BAD_REQUEST, "best_of is not supported (ask for n choices instead)", "unsupported",
                       param="best_of")
    logprobs = body.get("logprobs", (int, bool), None)
    if logprobs:
        raise ApiError(HTTPStatus.BAD_REQUEST, "logprobs are not supported: a diffusion canvas has no per-token "
                                               "left-to-right probabilities", "unsupported", param="logprobs")
    if body.get("logit_bias", (dict,), None):
        raise ApiError(HTTPStatus.BAD_REQUEST, "logit_bias is not supported", "unsupported", param="logit_bias")
    for name in NO_EFFECT:
        body.get(name, (int, float))  # type-checked, then without effect


def _stream(body: Fields) -> tuple[bool, bool]:
    stream = body.get("stream", (bool,), False)
    options = body.get("stream_options", (dict,), None)
    if options is not None and not stream:
        raise bad_value("stream_options", "stream_options is only allowed with stream: true")
    include_usage = False
    if options is not None:
        unknown = sorted(set(options) - {"include_usage"})
        if unknown:
            raise bad_value("stream_options", f"unknown stream_options: {', '.join(unknown)}")
        include_usage = Fields(options).get("include_usage", (bool,), False)
    return stream, include_usage


def _seed(seed: int | None, offset: int) -> int | None:
    return None if seed is None else seed + offset


def _text(content: Any, where: str) -> str:
    """A message's content: a string, or an array of text parts."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_value(where, f"{where} may hold only text parts ({{\"type\": \"text\", \"text\": ...}})")
            texts.append(part["text"])
        return "".join(texts)
    raise bad_value(where, f"{where} must be a string or an array of text parts")


def _messages(body: Fields) -> list[_Message]:
    messages = body.get("messages", (list,), None)
    if not messages:
        raise bad_value("messages", "messages must be a non-empty array")
    parsed = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise bad_value("messages", f"messages[{i}] must be an object with a role in {', '.join(ROLES)}")
        parsed.append(_Message(message["role"], _text(message.get("content"), f"messages[{i}].content")))
    return parsed


def _edit(body: Fields) -> _Edit | None:
    edit = body.get("edit", (dict,), None)
    prediction = body.get("prediction", (dict,), None)
    if edit is not None and prediction is not None:
        raise bad_value("edit", "send the code to edit in edit or in prediction, not both")
    if prediction is not None:
        if prediction.get("type") != "content":
            raise bad_value("prediction", 'prediction must be {"type": "content", "content": ...}')
        return _Edit(_text(prediction.get("content"), "prediction.content"))
    if edit is None:
        return None
    fields = Fields(edit)
    unknown = fields.unknown(("selection", "prefix", "suffix", "strength"))
    if unknown:
        raise bad_value("edit", f"unknown field(s) in edit: {', '.join(unknown)}; accepted: selection, prefix, "
                                "suffix, strength")
    selection = fields.get("selection", (str,), None)
    if selection is None:
        raise bad_value("edit", "edit needs selection: the code to rewrite")
    strength = fields.get("strength", (int, float), 0.6)
    if not 0 <= strength <= 1:
        raise bad_value("edit", f"edit.strength must be in [0, 1], got {strength}")
    return _Edit(selection, fields.get("prefix", (str,), ""), fields.get("suffix", (str,), ""), float(strength))


def chat_prompt(engine, messages: Sequence[_Message]) -> str:
    """The conversation as the text the model continues: its chat template when it has one."""
    tokenizer = getattr(engine, "tokenizer", None)
    turns = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in messages]
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        bos = getattr(tokenizer, "bos_token", None)
        return text[len(bos):] if bos and text.startswith(bos) else text  # the engine adds BOS itself
    return "".join(f"{t['role']}: {t['content']}\n" for t in turns) + "assistant: "


# ---------------------------------------------------------------------------------------------- answers
def _usage(usage: Usage) -> dict:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens}


class _OpenAIFormat:
    api = "openai"
    done_marker = True
    object = ""
    prefix = ""

    def __init__(self, model: str, include_usage: bool):
        self.model = model
        self.include_usage = include_usage
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = now()

    def _chunk(self, choices: list[dict]) -> dict:
        return {"id": self.id, "object": self.object + ".chunk" if self.object == "chat.completion" else self.object,
                "created": self.created, "model": self.model, "choices": choices}

    def stream_usage(self, usage: Usage) -> dict | None:
        return {**self._chunk([]), "usage": _usage(usage)} if self.include_usage else None


class CompletionFormat(_OpenAIFormat):
    object = "text_completion"
    prefix = "cmpl"

    def __init__(self, model: str, include_usage: bool, echo: list[str] | None = None):
        super().__init__(model, include_usage)
        self.echo = echo

    def response(self, outcomes: Sequence[Outcome], usage: Usage) -> dict:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": [{"text": (self.echo[o.index] if self.echo else "") + o.text, "index": o.index,
                             "logprobs": None, "finish_reason": o.finish_reason} for o in outcomes],
                "usage": _usage(usage)}

    def stream_start(self) -> list[dict]:
        if not self.echo:
            return []
        return [self.stream_delta(i, prompt) for i, prompt in enumerate(self.echo)]

    def stream_delta(self, index: int, text: str) -> dict:
        return self._chunk([{"text": text, "index": index, "logprobs": None, "finish_reason": None}])

    def stream_end(self, outcome: Outcome, usage: Usage | None) -> list[dict]:
        return [self._chunk([{"text": "", "index": outcome.index, "logprobs": None,
                              "finish_reason": outcome.finish_reason}])]


class ChatFormat(_OpenAIFormat):
    object = "chat.completion"
    prefix = "chatcmpl"

    def __init__(self, model: str, include_usage: bool):
        super().__init__(model, include_usage)
        self._started: set[int] = set()

    def response(self, outcomes: Sequence[Outcome], usage: Usage) -> dict:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": [{"index": o.index, "message": {"role": "assistant", "content": o.text},
                             "logprobs": None, "finish_reason": o.finish_reason} for o in outcomes],
                "usage": _usage(usage)}

    def stream_start(self) -> list[dict]:
        return []

    def stream_delta(self, index: int, text: str) -> dict:
        delta = {"content": text}
        if index not in self._started:  # the first delta of a choice names the role, as OpenAI's do
            self._started.add(index)
            delta = {"role": "assistant", **delta}
        return self._chunk([{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}])

    def stream_end(self, outcome: Outcome, usage: Usage | None) -> list[dict]:
        first = [] if outcome.index in self._started else [self.stream_delta(outcome.index, "")]
        return first + [self._chunk([{"index": outcome.index, "delta": {}, "logprobs": None,
                                      "finish_reason": outcome.finish_reason}])]
