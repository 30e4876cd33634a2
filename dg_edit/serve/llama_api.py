"""llama.cpp server's `POST /infill`, as llama.vim and llama.vscode call it, answered by the diffusion engine.

Request fields (llama.cpp's tools/server/README.md): `input_prefix`, `input_suffix`, `input_extra`
(`[{"filename", "text"}]`, chunks of other files: encoded ahead of the prefix within
`Settings.max_extra_tokens`, reused from the prefix cache while unchanged), `prompt` (text after the
FIM middle token in llama.cpp, i.e. the start of the middle: here it extends the prefix),
`n_predict` (-1: `Settings.max_new_tokens`; 0: nothing is generated, as llama.vim's warm-up
requests ask), `stream`, `stop`, `seed` (-1: random), `temperature` (scales the model's own
schedule; <= 0 is as deterministic as the sampler gets), `cache_prompt` (false: no prefix cache),
`id_slot` (one prefix-cache entry per slot and client), `return_tokens`, `response_fields`
(`"timings/predicted_n"` puts that nested value at the top level under that name, as llama.vim
reads it). Like llama.cpp, the route ignores the other /completion options (`top_k`, `top_p`,
`samplers`, `n_indent`, `t_max_predict_ms`, ...): they steer an autoregressive sampler.

Response: `content`, `tokens`, `stop`, `stop_type` (`eos`, `limit`, `word`), `stopping_word`,
`model`, `id_slot`, `tokens_predicted`, `tokens_evaluated`, `has_new_line`, `truncated`,
`generation_settings`, `timings` (`predicted_*` over the whole request, `prompt_n`). The engine
does not report per-request cache hits, so `tokens_cached` and the prompt timings are left out
rather than made up. Streamed, each event is `data: {"content": <new text>, "stop": false, ...}` and
the last one has `"stop": true` and the fields above; as llama.cpp's own /infill, no `[DONE]`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from .http_api import Call, Fields, Outcome, Usage, bad_value, temperature_sampling
from .protocol import ProtocolError, parse_extra
from .runner import Job

if TYPE_CHECKING:
    from .app import Service

RANDOM_SEEDS = (-1, 0xFFFFFFFF)  # llama.cpp's "no seed" values


def parse_infill(data: Any, service: "Service", client: str) -> Call:
    body = Fields(data)
    prefix = body.get("input_prefix", (str,), "") + body.get("prompt", (str,), "")
    suffix = body.get("input_suffix", (str,), "")
    try:
        extra = parse_extra(body.get("input_extra", (list,), []), field="input_extra", other_keys=True)
    except ProtocolError as e:
        raise bad_value("input_extra", e.message) from None
    n_predict = body.get("n_predict", (int,), -1)
    if n_predict < -1:
        raise bad_value("n_predict", f"n_predict must be -1 (the default budget), 0 or a positive count, got "
                                     f"{n_predict}")
    seed = body.get("seed", (int,), -1)
    if seed not in RANDOM_SEEDS and not 0 <= seed < 2 ** 64:
        raise bad_value("seed", f"seed must be -1 (random) or an integer in [0, 2**64), got {seed}")
    temperature = body.get("temperature", (int, float), None)
    slot = body.get("id_slot", (int,), -1)
    cache = body.get("cache_prompt", (bool,), True)
    response_fields = body.get("response_fields", (list,), None)
    if response_fields is not None and not all(isinstance(f, str) for f in response_fields):
        raise bad_value("response_fields", "response_fields must be an array of strings")
    max_new_tokens = None if n_predict == -1 else n_predict
    settings = {"n_predict": n_predict, "seed": seed, "temperature": temperature, "stop": list(body.strings("stop")),
                "cache_prompt": cache, "n_extra_chunks": len(extra)}
    job = Job("infill", prefix, suffix, max_new_tokens=max_new_tokens, seed=None if seed in RANDOM_SEEDS else seed,
              session=f"http:{client}:slot{slot}" if cache else None, single_line=body.get("single_line", (bool,), None),
              extra=extra, sampling=temperature_sampling(service.engine, temperature))
    fmt = InfillFormat(service.model_id, max(slot, 0), body.get("return_tokens", (bool,), False), response_fields,
                       settings)
    return Call([] if n_predict == 0 else [job], fmt, stream=body.get("stream", (bool,), False),
                stop=body.strings("stop"), drafts=body.get("drafts", (bool,), False), max_new_tokens=max_new_tokens,
                prompt_texts=(*extra, prefix, suffix))


class InfillFormat:
    api = "llama"
    done_marker = False

    def __init__(self, model: str, slot: int, return_tokens: bool, response_fields: list[str] | None,
                 settings: dict):
        self.model = model
        self.slot = slot
        self.return_tokens = return_tokens
        self.response_fields = response_fields
        self.settings = settings

    def response(self, outcomes: Sequence[Outcome], usage: Usage) -> dict:
        outcome = outcomes[0] if outcomes else Outcome(0, "", "length")
        return self._select(self._final(outcome, usage, outcome.text))

    def _final(self, outcome: Outcome, usage: Usage | None, content: str) -> dict:
        done = outcome.done
        ids = list(done.ids) if done is not None else []
        ms = done.ms if done is not None else 0.0
        stop_type = "word" if outcome.stopping_word else ("limit" if outcome.finish_reason == "length" else "eos")
        timings = {"predicted_n": len(ids), "predicted_ms": ms,
                   "predicted_per_token_ms": ms / len(ids) if ids else 0.0,
                   "predicted_per_second": 1000.0 * len(ids) / ms if ms else 0.0}
        if usage is not None:
            timings["prompt_n"] = usage.prompt_tokens
        return {"index": 0, "content": content, "tokens": ids if self.return_tokens else [], "id_slot": self.slot,
                "stop": True, "model": self.model, "tokens_predicted": len(ids),
                "tokens_evaluated": usage.prompt_tokens if usage is not None else 0,
                "generation_settings": self.settings, "has_new_line": "\n" in outcome.text, "truncated": False,
                "stop_type": stop_type, "stopping_word": outcome.stopping_word, "timings": timings}

    def _select(self, response: dict) -> dict:
        """llama.cpp's `response_fields`: only these, a "a/b" path lifted to the top level as "a/b"."""
        if self.response_fields is None:
            return response
        selected = {}
        for path in self.response_fields:
            value: Any = response
            for part in path.split("/"):
                if not isinstance(value, dict) or part not in value:
                    break
                value = value[part]
            else:
                selected[path] = value
        return selected

    def stream_start(self) -> list[dict]:
        return []

    def stream_delta(self, index: int, text: str) -> dict:
        return {"index": 0, "content": text, "tokens": [], "stop": False, "id_slot": self.slot}

    def stream_end(self, outcome: Outcome, usage: Usage | None) -> list[dict]:
        return [self._select(self._final(outcome, usage, ""))]  # the text came in the deltas

    def stream_usage(self, usage: Usage) -> dict | None:
        return None
