"""What can serve what: models, model groups and tools, from the config and live heartbeats."""

from __future__ import annotations

from collections.abc import Callable

from chainyard.contracts import Chain, Config, Deployment, LlmStep, Step, Target, WaitStep

TOOL_PROVIDER = "tool"


def tool_pool(name: str) -> str:
    return f"tool.{name}"


def tool_target(name: str) -> Target:
    pool = tool_pool(name)
    return Target(deployment=pool, pool=pool, provider=TOOL_PROVIDER, model=name)


def target_of(d: Deployment) -> Target:
    return Target(deployment=d.name, pool=d.pool, provider=d.provider, model=d.wire_model)


class Catalog:
    """Resolves a step's `model` (a model name or a group) to the deployments that can serve it."""

    def __init__(self, config: Config, pool_seen: Callable[[str], bool]) -> None:
        self.config = config
        self._pool_seen = pool_seen
        by_name = {d.name: d for d in config.deployments}
        self._by_model: dict[str, list[Deployment]] = {}
        for d in config.deployments:
            self._by_model.setdefault(d.model, []).append(d)
        for group, names in config.groups.items():
            self._by_model.setdefault(group, [])
            self._by_model[group] += [by_name[n] for n in names if n in by_name]
        for d in config.deployments:  # a deployment can also be asked for by its own name
            self._by_model.setdefault(d.name, [d])

    def deployments(self, step: LlmStep) -> list[Deployment]:
        found = self._by_model.get(step.model, [])
        if step.route.avoid:
            found = [
                d
                for d in found
                if d.pool not in step.route.avoid and d.name not in step.route.avoid
            ]
        if step.route.capabilities:
            need = set(step.route.capabilities)
            found = [d for d in found if need <= set(d.capabilities)]
        return found

    def known_tool(self, name: str) -> bool:
        return name in self.config.tools or self._pool_seen(tool_pool(name))

    def problems(self, chain: Chain) -> list[tuple[str, str]]:
        """(path, message) for every step no deployment or tool worker can serve."""
        out = []
        for i, step in enumerate(chain.steps):
            out += [(f"$.steps[{i}]{p}", m) for p, m in self._step_problems(step)]
        return out

    def _step_problems(self, step: Step) -> list[tuple[str, str]]:
        if isinstance(step, LlmStep):
            if step.model not in self._by_model:
                known = ", ".join(sorted(self._by_model)) or "none configured"
                return [(".model", f"no deployment serves model {step.model!r} (known: {known})")]
            if not self.deployments(step):
                return [(".route", f"no deployment of {step.model!r} meets the route constraints")]
            if step.loop:
                return [
                    (".loop.tools", f"unknown tool {t!r}: no worker serves pool {tool_pool(t)!r}")
                    for t in step.loop.tools
                    if not self.known_tool(t)
                ]
            return []
        if isinstance(step, WaitStep):
            return []
        if not self.known_tool(step.tool):
            return [
                (
                    ".tool",
                    f"unknown tool {step.tool!r}: no worker serves pool {tool_pool(step.tool)!r}",
                )
            ]
        return []
