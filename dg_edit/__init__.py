"""dg-edit: an editor backend for text-diffusion code infilling and in-line editing."""

from .config import SamplingConfig, Settings
from .engine import Engine
from .events import Done, Error, Step, Token

__all__ = ["Engine", "SamplingConfig", "Settings", "Step", "Done", "Error", "Token"]
__version__ = "0.1.0"
