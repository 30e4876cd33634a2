"""The text the tests' tiny tokenizer is trained on (`dg_edit.testing.tiny_tokenizer`).

Frozen: dg_edit/config.py as it read at commit f7282d7 (2026-12-04). The tokenizer used to be trained
on config.py's live source, so every edit of a Settings docstring changed the test tokenizer's merges,
hence the token ids and the random models' answers that seed-picked tests rely on
(tests/test_engine.py::test_single_line_stops_at_end_of_line failed after two such edits).
"""

CORPUS = r'''"""The one source of defaults for dg-edit.

`SamplingConfig` is the core's frozen config: the DiffusionGemma generation-config names plus the
two dg-edit additions (`noise`, `mask_token_id`). `Settings` is what every front end reads (CLI, LSP,
websocket service, TUI, editor plug-ins): request shaping, limits and the sampling overrides. Both
reject unknown keys with a clear `ValueError`, so a typo in an editor's settings is reported rather
than silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

# Environment variable holding the service token: `dg-edit serve` requires it, `dg-edit tui --connect` sends it.
TOKEN_ENV = "DG_EDIT_TOKEN"

# DiffusionGemma generation-config names accepted as `**sampling` everywhere.
SAMPLING_NAMES = (
    "max_denoising_steps",
    "t_min",
    "t_max",
    "entropy_bound",
    "stability_threshold",
    "confidence_threshold",
)


def _check_keys(cls: type, data: Mapping[str, Any], allowed: set[str] | None = None) -> None:
    allowed = allowed if allowed is not None else {f.name for f in fields(cls)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(
            f"unknown {cls.__name__} key(s): {', '.join(unknown)}; accepted: {', '.join(sorted(allowed))}"
        )


def _coerce(name: str, value: Any, default: Any) -> Any:
    """Type-check one value against its default's type; ints are accepted where floats are expected."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number, got {value!r}")
        return float(value)
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return value
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list, got {value!r}")
        return tuple(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {value!r}")
        return value
    return value


@dataclass(frozen=True)
class SamplingConfig:
    """How one canvas is denoised. Defaults are DiffusionGemma's own (`generation_diffusion_gemma.py`)."""

    max_denoising_steps: int = 48
    t_min: float = 0.4
    t_max: float = 0.8
    entropy_bound: float = 0.1
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    # dg-edit additions: "uniform" is DiffusionGemma's renoising; "mask" renoises to `mask_token_id`.
    noise: str = "uniform"
    mask_token_id: int | None = None
    # How the denoiser canvas is drawn: "multinomial" (the reference's call), "inverse_cdf" (same
    # distribution, ~10x faster on CPU), "auto" (reference for plain canvases, fast for clamped/batched).
    draw: str = "auto"

    def __post_init__(self) -> None:
        if self.max_denoising_steps <= 0:
            raise ValueError(f"max_denoising_steps must be a positive integer, got {self.max_denoising_steps}")
        if self.t_min < 0 or self.t_max < 0 or self.t_max <= self.t_min:
            raise ValueError(f"need 0 <= t_min < t_max, got t_min={self.t_min}, t_max={self.t_max}")
        if self.entropy_bound <= 0:
            raise ValueError(f"entropy_bound must be > 0, got {self.entropy_bound}")
        if self.stability_threshold < 0:
            raise ValueError(f"stability_threshold must be >= 0, got {self.stability_threshold}")
        if self.confidence_threshold <= 0:
            raise ValueError(f"confidence_threshold must be > 0, got {self.confidence_threshold}")
        if self.noise not in ("uniform", "mask"):
            raise ValueError(f'noise must be "uniform" or "mask", got {self.noise!r}')
        if self.draw not in ("auto", "multinomial", "inverse_cdf"):
            raise ValueError(f'draw must be "auto", "multinomial" or "inverse_cdf", got {self.draw!r}')
        if self.noise == "mask" and self.mask_token_id is None:
            raise ValueError('noise="mask" needs a mask_token_id')

    def replace(self, **overrides: Any) -> "SamplingConfig":
        """A copy with `overrides` applied; unknown names raise `ValueError`."""
        if not overrides:
            return self
        _check_keys(type(self), overrides)
        current = dataclasses.asdict(self)
        coerced = {}
        for k, v in overrides.items():
            if k == "mask_token_id":
                coerced[k] = v
            else:
                coerced[k] = _coerce(k, v, current[k] if current[k] is not None else v)
        return dataclasses.replace(self, **coerced)


@dataclass(frozen=True)
class Settings:
    """Defaults shared by every front end. `Settings.from_dict` rejects unknown keys.

    | key | default | what for |
    |---|---|---|
    | model | "" | local model directory; "" = the embedded default model |
    | max_new_tokens | 48 | longest middle an inline completion may produce |
    | single_line_tokens | 32 | budget when the cursor's line already has text (99% of stdlib and HumanEval lines fit) |
    | candidates | 3 | items for an explicitly invoked inline completion |
    | languages | ("*",) | languageIds served by the LSP; "*" = all |
    | max_prefix_tokens | 2048 | prefix window, cut on the left |
    | max_suffix_tokens | 512 | suffix window, cut on the right |
    | suffix_head_tokens | 16 | suffix tokens clamped into the canvas |
    | max_extra_tokens | 1024 | chunks of other files ahead of the prefix (llama.cpp's input_extra, the LSP's other open documents); 0 = none |
    | prefix_chunk | 64 | encoder chunk (absolute positions) for bitwise-identical prefix-cache reuse |
    | cache_budget_mb | 1024 | encoder caches of all documents together; least recently used documents go first |
    | idle_prefill | true | encode a document's missing windows in the background while the editor is quiet |
    | idle_prefill_ms | 500 | how long the editor must be quiet (no change, no request) before idle prefill runs |
    | typed_ahead | true | a prefix that types the start of the last answer gets the rest of it, without the model |
    | debounce_ms | 150 | editor plug-ins wait this long after a keystroke |
    | host / port | 127.0.0.1 / 8765 | `dg-edit serve` address (websocket and HTTP APIs) |
    | max_message_bytes | 1 MiB | largest websocket frame or HTTP request body accepted |
    | max_inflight | 4 | concurrent requests per websocket connection; engine streams per client address over HTTP |
    | request_timeout_s | 60 | a request running longer is cancelled |
    | compile_step | false | run the step's tensor work through torch.compile (dg_edit/step.py; bench/memory.py measures it) |
    | sampling | {} | overrides of SamplingConfig names |
    """

    model: str = ""
    max_new_tokens: int = 48
    single_line_tokens: int = 32
    candidates: int = 3
    languages: tuple = ("*",)
    max_prefix_tokens: int = 2048
    max_suffix_tokens: int = 512
    suffix_head_tokens: int = 16
    max_extra_tokens: int = 1024
    prefix_chunk: int = 64
    cache_budget_mb: int = 1024
    idle_prefill: bool = True
    idle_prefill_ms: int = 500
    typed_ahead: bool = True
    debounce_ms: int = 150
    host: str = "127.0.0.1"
    port: int = 8765
    max_message_bytes: int = 1 << 20
    max_inflight: int = 4
    request_timeout_s: float = 60.0
    compile_step: bool = False
    sampling: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "single_line_tokens", "candidates", "max_prefix_tokens", "prefix_chunk", "max_message_bytes",
                     "max_inflight"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_suffix_tokens < 0 or self.suffix_head_tokens < 0 or self.max_extra_tokens < 0:
            raise ValueError("max_suffix_tokens, suffix_head_tokens and max_extra_tokens must be >= 0")
        if self.cache_budget_mb < 0 or self.idle_prefill_ms < 0:
            raise ValueError("cache_budget_mb and idle_prefill_ms must be >= 0")
        if self.request_timeout_s <= 0:
            raise ValueError("request_timeout_s must be positive")
        _check_keys(SamplingConfig, self.sampling)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, base: "Settings | None" = None) -> "Settings":
        """Settings from a JSON-like mapping (editor settings, initializationOptions, a config file).

        Sampling names may appear at the top level too (`{"max_denoising_steps": 12}`); they go to
        `sampling`. Anything else unknown raises `ValueError`.
        """
        base = base or cls()
        if data is None:
            return base
        if not isinstance(data, Mapping):
            raise ValueError(f"settings must be an object, got {type(data).__name__}")
        own = {f.name for f in fields(cls)}
        sampling_names = {f.name for f in fields(SamplingConfig)}
        _check_keys(cls, data, own | sampling_names)
        values: dict[str, Any] = {}
        sampling = dict(base.sampling)
        for key, value in data.items():
            if key == "sampling":
                if not isinstance(value, Mapping):
                    raise ValueError("sampling must be an object")
                _check_keys(SamplingConfig, value)
                sampling.update(value)
            elif key in own:
                default = getattr(cls(), key)
                if key == "model" and value is None:
                    value = ""
                values[key] = _coerce(key, value, default)
            else:
                sampling[key] = value
        # Validate sampling values now, not at the first request.
        SamplingConfig().replace(**{k: v for k, v in sampling.items() if k not in ("noise", "mask_token_id")})
        return dataclasses.replace(base, **values, sampling=sampling)

    @classmethod
    def from_file(cls, path: str | Path) -> "Settings":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"settings file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"settings file {path} is not valid JSON: {e}") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["languages"] = list(self.languages)
        d["sampling"] = dict(self.sampling)
        return d
'''
