"""The operator's configuration file (TOML), shared by router and workers.

Each service reads the sections it needs: the router `deployments`, `groups` and `tools`;
a worker its entry in `pools` and the prices of the deployments it serves.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from ._chain import Capability, Strategy
from ._errors import ConfigError
from ._topology import Subjects, Topology

ProviderKind = Literal["openai", "anthropic", "gemini", "null"]
Name = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


class Price(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """USD per million tokens; overrides the genai-prices table (self-hosted models)."""

    input_per_mtok: float = 0.0
    output_per_mtok: float = 0.0


class Deployment(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A model served by a pool. Steps ask for `model` (or a group naming this deployment)."""

    name: Name
    pool: Name
    model: str
    provider_model: str | None = None  # the provider's name, when it differs from `model`
    provider: ProviderKind = "openai"
    price: Price | None = None  # None: look it up in genai-prices
    context_window: int = 8192
    capabilities: list[Capability] = []
    weight: float = 1.0
    expected_latency_ms: float | None = None  # prior for routing until heartbeats report one

    @property
    def wire_model(self) -> str:
        return self.provider_model or self.model


Quantity = Annotated[str, Meta(pattern=r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$")]


class Scale(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How `chainyard deploy k8s` runs a pool (docs/KUBERNETES.md); services ignore it.

    KEDA keeps ceil(lag / lag_threshold) replicas within [min_replicas, max_replicas]; lag is the
    pool consumer's pending plus unacknowledged messages. min_replicas 0: scale to zero; routers
    then queue the pool's work while no worker runs (a pool with free slots elsewhere is still
    preferred), and that lag wakes it.
    cpu and memory: one replica's requests and limits (Kubernetes quantities)."""

    min_replicas: Annotated[int, Meta(ge=0, le=10_000)] = 1
    max_replicas: Annotated[int, Meta(ge=1, le=10_000)] = 10
    lag_threshold: Annotated[int, Meta(ge=1)] | None = None  # None: the pool's slots
    cpu_request: Quantity = "250m"
    cpu_limit: Quantity = "2"
    memory_request: Quantity = "256Mi"
    memory_limit: Quantity = "1Gi"

    def __post_init__(self) -> None:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})"
            )


class PoolConfig(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A worker pool: which provider API it speaks and where. Keys come from the environment."""

    name: Name
    provider: ProviderKind = "openai"
    base_url: str = ""
    api_key_env: str | None = None  # the variable's name, never the key itself
    slots: Annotated[int, Meta(ge=1, le=100_000)] = 64
    timeout_s: float = 600.0
    # The provider's HTTP client (workers/providers/_http.py). proxy: an http:// forward proxy
    # URL (credentials allowed); unset, HTTPS_PROXY / HTTP_PROXY / NO_PROXY apply. ca_bundle: a
    # PEM file of the CAs to trust instead of the default ones (or set SSL_CERT_FILE).
    proxy: str | None = None
    ca_bundle: str | None = None
    max_response_mb: Annotated[float, Meta(gt=0)] = 32.0  # a longer answer fails the attempt
    # Where the pool's workers run (docs/SCALING.md, "Regions"): routers prefer pools in their
    # own region. None: no region, as near to every router as its own region's pools.
    region: Name | None = None
    scale: Scale = msgspec.field(default_factory=Scale)  # Kubernetes only (`deploy k8s`)


class ToolPoolConfig(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A tool's pool (`tool.<name>`). A tool without an entry gets these defaults."""

    name: Name  # the tool's name
    # One call may take this long; then the step fails (class "timeout"). A sync tool's
    # thread cannot be stopped: it runs on, the step's result is no longer waited for.
    timeout_s: Annotated[float, Meta(gt=0)] = 60.0
    scale: Scale = msgspec.field(default_factory=Scale)  # Kubernetes only (`deploy k8s`)


class RouterConfig(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The `[router]` table: settings of a router process (docs/SCALING.md, "Regions")."""

    # The router's region (`--region`, env CHAINYARD_REGION, else this); None: no preference.
    region: Name | None = None
    # A pool in another region wins over the router's own region's only when its estimated cost
    # is lower by more than this fraction of the cheapest local one (0.2: 20 % cheaper).
    cross_region_margin: Annotated[float, Meta(ge=0, le=1)] = 0.2


class CacheConfig(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The shared response cache (`[cache]`; docs/OPERATIONS.md). Steps opt in one by one."""

    # Tenants never share answers unless the operator says they may (one company's tenants).
    shared_across_tenants: bool = False
    max_bytes: Annotated[int, Meta(ge=1024)] = 256 * 1024 * 1024  # the bucket; oldest go first
    max_entry_bytes: Annotated[int, Meta(ge=256, le=1024 * 1024)] = 256 * 1024  # larger: not kept
    max_ttl_s: Annotated[float, Meta(gt=0)] = 86400.0  # the bucket's max age bounds every ttl_s


class Config(Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    prefix: Name = "cy"
    strategy: Strategy = "balanced"
    max_attempts: Annotated[int, Meta(ge=1, le=20)] = 3
    replicas: Annotated[int, Meta(ge=1, le=5)] = 1  # JetStream replicas of every stream/bucket
    work_ack_wait_s: Annotated[float, Meta(gt=0)] = 30.0  # a silent worker's step is redelivered
    deployments: list[Deployment] = []
    groups: dict[str, list[str]] = {}
    pools: list[PoolConfig] = []
    tools: list[str] = []
    tool_pools: list[ToolPoolConfig] = []
    # Routing (docs/ROUTING.md). All have defaults so older config files keep loading.
    default_max_tokens: Annotated[int, Meta(ge=1)] = (
        1024  # budget reservation when a step sets none
    )
    capacity_wait_s: Annotated[float, Meta(ge=0)] = (
        30.0  # longest wait for capacity without a deadline
    )
    breaker_failures: Annotated[int, Meta(ge=1)] = 5  # consecutive failures that open a breaker
    breaker_throttles: Annotated[int, Meta(ge=1)] = 3  # consecutive 429s that open a breaker
    breaker_cooldown_s: Annotated[float, Meta(gt=0)] = 5.0  # first open period; doubles per reopen
    breaker_max_cooldown_s: Annotated[float, Meta(gt=0)] = 60.0
    breaker_probes: Annotated[int, Meta(ge=1)] = 2  # dispatches let through while half-open
    tenant_max_outstanding: Annotated[int, Meta(ge=0)] = 0  # per router replica; 0: no cap
    backlog_poll_s: Annotated[float, Meta(gt=0)] = 1.0  # pool consumer backlog poll period
    router: RouterConfig = RouterConfig()
    cache: CacheConfig = CacheConfig()
    # Tenants with a `tenant` label of their own in the metrics; the rest count as `other`.
    metrics_max_tenants: Annotated[int, Meta(ge=0, le=10_000)] = 50
    # How long an ended chain's state is kept, in seconds (the events' own 7 days by default):
    # while kept, its id answers a resubmit with its end and GET /v1/chains/{id} finds it.
    # Then the server removes it (a per-message TTL). 0: kept until deleted by hand. At least
    # the streams' duplicate window (`__post_init__`).
    ended_chain_ttl_s: Annotated[int, Meta(ge=0)] = 7 * 24 * 3600

    def __post_init__(self) -> None:
        # A chain's messages carry ids made of its tenant, id, step and attempt, which the
        # streams take for repeats within their duplicate window: an id freed sooner would run
        # again with its assignments and end dropped as repeats of the first run's.
        window = max(s.duplicate_window_s for s in self.topology.streams)
        if 0 < self.ended_chain_ttl_s < window:
            raise ValueError(
                f"ended_chain_ttl_s: 0 (kept until deleted) or at least {window:.0f} s, the "
                "streams' duplicate window: a chain id freed sooner would run again with its "
                "messages dropped as repeats of the earlier run's"
            )

    @property
    def topology(self) -> Topology:
        return Topology(
            subjects=Subjects(prefix=self.prefix),
            replicas=self.replicas,
            work_ack_wait_s=self.work_ack_wait_s,
        )

    def deployment(self, name: str) -> Deployment:
        for d in self.deployments:
            if d.name == name:
                return d
        raise KeyError(name)

    def pool(self, name: str) -> PoolConfig:
        for p in self.pools:
            if p.name == name:
                return p
        raise KeyError(name)

    def tool_pool(self, tool: str) -> ToolPoolConfig:
        """The tool's pool settings: its entry in `tool_pools`, else the defaults."""
        for p in self.tool_pools:
            if p.name == tool:
                return p
        return ToolPoolConfig(name=tool)

    def scaled_to_zero(self) -> list[str]:
        """The work pools (`tool.<name>` for a tool's) whose `scale.min_replicas` is 0."""
        pools = [p.name for p in self.pools if p.scale.min_replicas == 0]
        return pools + [f"tool.{p.name}" for p in self.tool_pools if p.scale.min_replicas == 0]


def dump_config(config: Config) -> bytes:
    """The config as TOML (unset optional fields left out: TOML has no null)."""

    def drop_none(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: drop_none(x) for k, x in v.items() if x is not None}
        if isinstance(v, list):
            return [drop_none(x) for x in v]
        return v

    return msgspec.toml.encode(drop_none(msgspec.to_builtins(config)))


def load_config(path: str | Path) -> Config:
    """Read a TOML config; every error is one line naming the file, the field and its value."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file: {e.strerror or e}") from e
    try:
        return msgspec.toml.decode(data, type=Config)
    except msgspec.ValidationError as e:
        raise ConfigError(f"{path}: {_where(data, str(e))}") from e
    except msgspec.DecodeError as e:
        raise ConfigError(f"{path}: {e}") from e


def _where(data: bytes, error: str) -> str:
    """msgspec's "Expected `int`, got `str` - at `$.pools[0].slots`" as
    "$.pools[0].slots = 'many': Expected `int`, got `str`" (the value read from the file)."""
    message, sep, at = error.rpartition(" - at `")
    if not sep:
        return error
    field = at.rstrip("`")
    value: Any = msgspec.toml.decode(data)
    for key in re.findall(r"\.([^.\[]+)|\[(\d+)\]", field.removeprefix("$")):
        try:
            value = value[key[0]] if key[0] else value[int(key[1])]
        except (KeyError, IndexError, TypeError):
            return f"{field}: {message}"
    if isinstance(value, dict | list):  # a table: the message names what is wrong in it
        return f"{field}: {message}"
    return f"{field} = {value!r}: {message}"
