"""Tool workers: a decorator turns a Python function into tool `<name>`, in pool `tool.<name>`.

The tool's JSON Schema comes from its type hints; arguments are validated against them before
the function runs, so a model's malformed call is a clear failure, not a TypeError deep inside.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, get_type_hints

import msgspec

from chainyard.contracts import Assignment, Output, ToolSpec, ToolStep
from chainyard.runtime.genai import traced_tool

from .providers._base import ProviderError
from .runtime import Result

DEFAULT_TOOL_TIMEOUT_S = 60.0  # contracts ToolPoolConfig.timeout_s: a config sets it per tool


@dataclass(frozen=True)
class Tool:
    name: str
    fn: Callable[..., Any]
    args_type: type[msgspec.Struct]
    description: str

    @property
    def pool(self) -> str:
        return f"tool.{self.name}"

    @property
    def spec(self) -> ToolSpec:
        schema = msgspec.json.schema(self.args_type)
        # Inline the one struct definition so the schema stands alone for a model.
        body = schema.get("$defs", {}).get(self.args_type.__name__, schema)
        body = {k: v for k, v in body.items() if k != "title"}
        return ToolSpec(name=self.name, description=self.description, parameters=body)

    async def __call__(self, args: dict[str, Any]) -> Any:
        try:
            parsed = msgspec.convert(args, self.args_type, strict=False)
        except msgspec.ValidationError as e:
            raise ProviderError("fatal", f"tool {self.name!r}: bad arguments: {e}") from e
        kwargs = msgspec.structs.asdict(parsed)
        if inspect.iscoroutinefunction(self.fn):
            return await self.fn(**kwargs)
        return await asyncio.to_thread(self.fn, **kwargs)


@dataclass
class Tools:
    """A registry of tools. `@tools.tool` or `@tools.tool(name="...")` adds one."""

    by_name: dict[str, Tool] = field(default_factory=dict)

    def tool(self, fn: Callable[..., Any] | None = None, *, name: str | None = None) -> Any:
        def register(f: Callable[..., Any]) -> Callable[..., Any]:
            t = _make_tool(f, name or f.__name__)
            if t.name in self.by_name:
                raise ValueError(f"tool {t.name!r} registered twice")
            self.by_name[t.name] = t
            return f

        return register(fn) if fn is not None else register

    def __iter__(self):
        return iter(self.by_name.values())

    def specs(self, names: list[str] | None = None) -> list[ToolSpec]:
        return [t.spec for t in self if names is None or t.name in names]


def _make_tool(fn: Callable[..., Any], name: str) -> Tool:
    hints = get_type_hints(fn)
    fields: list[Any] = []
    for p in inspect.signature(fn).parameters.values():
        tp = hints.get(p.name, Any)
        fields.append((p.name, tp) if p.default is p.empty else (p.name, tp, p.default))
    args_type = msgspec.defstruct(f"{name}_args", fields, kw_only=True, forbid_unknown_fields=True)
    doc = inspect.getdoc(fn) or ""
    return Tool(name=name, fn=fn, args_type=args_type, description=doc.split("\n\n")[0])


def tool_executor(
    tool: Tool, timeout_s: float = DEFAULT_TOOL_TIMEOUT_S
) -> Callable[[Assignment, Any], Any]:
    """Run `tool` for an assignment; a call that outlasts `timeout_s` (or the chain's deadline,
    whichever comes first) fails with class "timeout"."""

    async def execute(a: Assignment, on_delta: Any = None) -> Result:
        if not isinstance(a.step, ToolStep) or a.step.tool != tool.name:
            raise ProviderError("fatal", f"pool {tool.pool!r} got a step for {a.step!r}")
        limit_s, why = timeout_s, f"tool {tool.name!r} did not return within {timeout_s:g} s"
        left = a.deadline_at_ms / 1000 - time.time() if a.deadline_at_ms else None
        if left is not None and left < limit_s:
            limit_s, why = max(left, 0.001), "the step's deadline passed during the call"
        timeout = asyncio.timeout(limit_s)  # not wait_for: no extra task per call
        try:
            async with timeout:
                value = await tool(a.step.args)
        except ProviderError:
            raise
        except Exception as e:
            if isinstance(e, TimeoutError) and timeout.expired():
                raise ProviderError("timeout", why) from None
            raise ProviderError(
                "fatal", f"tool {tool.name!r} raised {type(e).__name__}: {e}"
            ) from e
        try:
            data = msgspec.to_builtins(value)
        except TypeError as e:
            raise ProviderError(
                "fatal", f"tool {tool.name!r} returned a value that is not JSON: {e}"
            ) from e
        text = data if isinstance(data, str) else ""
        return Result(output=Output(text=text, data=None if text else data))

    return traced_tool(tool.name, execute)  # an `execute_tool {name}` span when tracing is on
