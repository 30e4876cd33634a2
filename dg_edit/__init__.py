"""dg-edit: an editor backend for text-diffusion code infilling and in-line editing."""

from .config import SamplingConfig, Settings
from .events import Done, Error, Step, Token

__all__ = ["Engine", "SamplingConfig", "Settings", "Step", "Done", "Error", "Token"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # `Engine` imports torch and transformers (seconds): only when asked for, so front ends can
    # answer their first message (LSP `initialize`, `--help`) before the model stack is imported.
    if name == "Engine":
        from .engine import Engine

        return Engine
    raise AttributeError(f"module 'dg_edit' has no attribute {name!r}")
