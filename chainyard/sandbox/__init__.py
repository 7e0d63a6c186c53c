"""Local imitations of the OpenAI, Anthropic and Gemini APIs, for tests, demos and benchmarks."""

from ._core import Answer, Captured, SandboxConfig, answer
from .providers import ENDPOINTS, SandboxServer, make_app

__all__ = [
    "ENDPOINTS",
    "Answer",
    "Captured",
    "SandboxConfig",
    "SandboxServer",
    "answer",
    "make_app",
]
