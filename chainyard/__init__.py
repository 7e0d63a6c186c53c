"""chainyard: a message-queue driven agent worker pool on NATS.

The public API, in one place. Everything else is the services' own code and may change:

    from chainyard import Client, Chain, LlmStep, ToolStep, Message, ChainCompleted

    async with await Client.connect("nats://127.0.0.1:4222", "acme") as client:
        ended = await client.run(Chain(id="hello", steps=[LlmStep(...)]))

Names load on first use, so `import chainyard.contracts` (all a client in a hurry needs) pulls
in neither the NATS client nor the worker runtime. The exception tree is documented in
`chainyard.contracts._errors`: every error raised on purpose is a `ChainyardError`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "Chain",
    "ChainCancelled",
    "ChainCompleted",
    "ChainEnded",
    "ChainFailed",
    "ChainRejected",
    "ChainStatusRow",
    "ChainTimeout",
    "ChainyardError",
    "Client",
    "Config",
    "ConfigError",
    "ControlAccepted",
    "ControlRejected",
    "Event",
    "LlmStep",
    "Loop",
    "Message",
    "NoSuchChain",
    "Output",
    "Params",
    "PermissionDenied",
    "ProviderError",
    "Route",
    "Step",
    "StepCompleted",
    "StepFailed",
    "StepOverride",
    "ToolSpec",
    "ToolStep",
    "Tools",
    "Usage",
    "WaitStep",
    "load_config",
]

# Where a name is defined, when not in the contracts.
_ELSEWHERE = {
    "ChainStatusRow": "chainyard.client",
    "Client": "chainyard.client",
    "NoSuchChain": "chainyard.client",
    "PermissionDenied": "chainyard.refusals",
    "ProviderError": "chainyard.workers.providers",
    "Tools": "chainyard.workers.tools",
}


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'chainyard' has no attribute {name!r}")
    module = importlib.import_module(_ELSEWHERE.get(name, "chainyard.contracts"))
    value = getattr(module, name)
    globals()[name] = value  # once: later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return [*globals(), *__all__]


if TYPE_CHECKING:  # for type checkers and editors: the same names, eagerly
    from chainyard.client import ChainStatusRow, Client, NoSuchChain
    from chainyard.contracts import (
        Chain,
        ChainCancelled,
        ChainCompleted,
        ChainEnded,
        ChainFailed,
        ChainRejected,
        ChainTimeout,
        ChainyardError,
        Config,
        ConfigError,
        ControlAccepted,
        ControlRejected,
        Event,
        LlmStep,
        Loop,
        Message,
        Output,
        Params,
        Route,
        Step,
        StepCompleted,
        StepFailed,
        StepOverride,
        ToolSpec,
        ToolStep,
        Usage,
        WaitStep,
        load_config,
    )
    from chainyard.refusals import PermissionDenied
    from chainyard.workers.providers import ProviderError
    from chainyard.workers.tools import Tools
