"""The Kubernetes objects of one chainyard deployment, from its config (docs/KUBERNETES.md).

Everything is derived from the config, so pools and manifests cannot drift: one worker
Deployment and one KEDA ScaledObject per pool and per tool pool (the scaler reads the pool's own
durable consumer on the work stream, `Topology.pool_consumer`), the router and the gateway, a
ConfigMap named after its content (a config change rolls every pod), PodDisruptionBudgets, a
ServiceAccount without a token, a NetworkPolicy. Objects are plain dicts; `to_files` writes them
with sorted keys in a fixed order, so the same config always gives the same bytes.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from chainyard.contracts import Config, Scale
from chainyard.contracts._yaml import to_yaml

Obj = dict[str, Any]

METRICS_PORT = 9464  # --metrics-port: /metrics, /healthz, /readyz
GATEWAY_PORT = 8080
CONFIG_DIR = "/etc/chainyard"
CONFIG_PATH = f"{CONFIG_DIR}/chainyard.toml"
UID = 10001  # the image's user (deploy/Dockerfile)
# A stopping worker finishes its calls in flight (each bounded by the pool's timeout_s), then
# publishes their results and drains its connection: this margin covers the last two.
DRAIN_MARGIN_S = 30
SERVICE_GRACE_S = 60  # router and gateway: no provider call to wait for
TOOL_SLOTS = 64  # chainyard.stack.tool_workers' slots per tool process
REGION_LABEL = "topology.kubernetes.io/region"
KIND_ORDER = (
    "Namespace",
    "ServiceAccount",
    "ConfigMap",
    "NetworkPolicy",
    "Service",
    "Deployment",
    "PodDisruptionBudget",
    "ScaledObject",
)
# Checks of checkov that these manifests do not meet, on purpose; each rendered object that the
# check applies to carries the skip and its reason (checkov reads `checkov.io/skipN`).
SKIPS = {
    "CKV_K8S_43": "the image is named by tag here; pin its digest in an overlay "
    "(kustomize `images:`, docs/KUBERNETES.md), which this renderer cannot know",
    "CKV_K8S_15": "IfNotPresent: the tag is fixed (or the digest pinned by an overlay), so "
    "Always would only re-pull on every start and break clusters with side-loaded images",
    "CKV_K8S_35": "chainyard reads the NATS URL and provider keys from environment variables "
    "(CHAINYARD_NATS, api_key_env); they come from Secrets by reference, never as values",
}


@dataclass(frozen=True, kw_only=True)
class Settings:
    """What the config does not say: where things run and which Secrets hold what."""

    namespace: str = "chainyard"
    image: str = ""  # "": chainyard:<installed version>
    tools: str | None = None  # module:attribute of the Tools registry, in the image
    # key `url`: nats://services:PASSWORD@host:4222; key `gateway-url`: the gateway's own user
    # (nats://gateway:PASSWORD@host:4222, deploy/accounts.conf), which cannot touch the work
    nats_secret: str = "chainyard-nats"
    keys_secret: str = "chainyard-provider-keys"  # one key per pool's api_key_env
    nats_monitoring: str = "nats-headless.nats.svc.cluster.local:8222"
    nats_account: str = "CHAINYARD"  # deploy/accounts.conf
    router_replicas: int = 2
    gateway_replicas: int = 2

    @property
    def image_ref(self) -> str:
        if self.image:
            return self.image
        try:
            return f"chainyard:{version('chainyard')}"
        except PackageNotFoundError:
            return "chainyard:dev"


class RenderError(ValueError):
    """The config and settings cannot make a deployment (the message says why)."""


def dns_name(*parts: str) -> str:
    """A DNS-1123 label from `parts`: lowercase, `-` for anything else; when that changed the
    name, a hash of the original keeps two pools (`a_b`, `a.b`) apart."""
    raw = "-".join(parts)
    name = re.sub(r"[^a-z0-9-]+", "-", raw.lower()).strip("-")
    if name == raw and len(name) <= 63:
        return name
    tag = hashlib.sha256(raw.encode()).hexdigest()[:6]
    return f"{name[: 63 - len(tag) - 1].rstrip('-')}-{tag}"


def label_value(value: str) -> str:
    ok = re.fullmatch(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?", value)
    return value if ok else dns_name(value)


@dataclass(frozen=True, kw_only=True)
class Workload:
    """One worker Deployment: an LLM pool or a tool's pool."""

    name: str  # object name
    pool: str  # the pool as NATS knows it (`cloud`, `tool.weather`)
    args: list[str]
    slots: int
    timeout_s: float
    scale: Scale
    region: str | None
    env: list[Obj]


def render(config: Config, config_text: str, s: Settings) -> list[Obj]:
    """Every object, in apply order (`KIND_ORDER`, then name)."""
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", s.namespace):
        raise RenderError(f"--namespace {s.namespace!r}: not a DNS label (a-z, 0-9, '-')")
    tools = sorted(set(config.tools) | {p.name for p in config.tool_pools})
    if tools and not s.tools:
        raise RenderError(
            f"the config names tools ({', '.join(tools)}): --tools MODULE:ATTR says which "
            "module of the image serves them (e.g. chainyard.demo:tools)"
        )
    cm_name = "chainyard-config-" + hashlib.sha256(config_text.encode()).hexdigest()[:10]
    objs: list[Obj] = [
        _namespace(s),
        _service_account(s),
        _config_map(s, cm_name, config_text),
        _network_policy(s),
    ]
    base = ["--config", CONFIG_PATH]
    # Routers prefer pools in their own region (CHAINYARD_REGION): with regions, one router
    # Deployment per region, placed there; without, one for all.
    regions = sorted({r for p in config.pools if (r := getattr(p, "region", None))})
    for region in regions:
        if label_value(region) != region:  # no node could carry it: say so now
            raise RenderError(f"region {region!r} cannot be a Kubernetes label value")
    for region in regions or [None]:
        name = dns_name("chainyard-router", region) if region else "chainyard-router"
        env = [{"name": "CHAINYARD_REGION", "value": region}] if region else []
        router = _deployment(
            s,
            name=name,
            component="router",
            args=["router", *base, "--metrics-port", str(METRICS_PORT)],
            port=METRICS_PORT,
            grace_s=SERVICE_GRACE_S,
            scale=Scale(),
            region=region,
            env=env,
            config_map=cm_name,
            replicas=s.router_replicas,
        )
        objs += [router, _pdb(s, name, min_available=1)]
    gateway = _deployment(
        s,
        name="chainyard-gateway",
        component="gateway",
        args=["gateway", *base, "--host", "0.0.0.0", "--port", str(GATEWAY_PORT)],
        port=GATEWAY_PORT,
        grace_s=SERVICE_GRACE_S,
        scale=Scale(),
        region=None,
        env=[],
        config_map=cm_name,
        replicas=s.gateway_replicas,
        nats_url_key="gateway-url",
    )
    objs += [gateway, _pdb(s, "chainyard-gateway", min_available=1), _gateway_service(s)]
    for w in _workloads(config, s, base, tools):
        objs.append(
            _deployment(
                s,
                name=w.name,
                component="worker",
                args=w.args,
                port=METRICS_PORT,
                grace_s=math.ceil(w.timeout_s) + DRAIN_MARGIN_S,
                scale=w.scale,
                region=w.region,
                env=w.env,
                config_map=cm_name,
                replicas=None,  # KEDA owns the count: an apply must not reset it
                pool=w.pool,
            )
        )
        objs.append(_pdb(s, w.name, max_unavailable=1))
        objs.append(_scaled_object(s, config, w))
    return sorted(objs, key=lambda o: (KIND_ORDER.index(o["kind"]), o["metadata"]["name"]))


def _workloads(config: Config, s: Settings, base: list[str], tools: list[str]) -> list[Workload]:
    metrics = ["--metrics-port", str(METRICS_PORT)]
    out = []
    for p in config.pools:
        env = []
        if p.api_key_env:
            env.append(_secret_env(p.api_key_env, s.keys_secret, p.api_key_env))
        out.append(
            Workload(
                name=dns_name("chainyard-pool", p.name),
                pool=p.name,
                args=["worker", *base, "--pool", p.name, *metrics],
                slots=p.slots,
                timeout_s=p.timeout_s,
                scale=p.scale,
                region=getattr(p, "region", None),
                env=env,
            )
        )
    for name in tools:
        tp = config.tool_pool(name)
        pool = f"tool.{name}"
        out.append(
            Workload(
                name=dns_name("chainyard-tool", name),
                pool=pool,
                args=["worker", *base, "--tools", str(s.tools), "--pool", pool, *metrics],
                slots=TOOL_SLOTS,
                timeout_s=tp.timeout_s,
                scale=tp.scale,
                region=getattr(tp, "region", None),
                env=[],
            )
        )
    return out


# -- objects ---------------------------------------------------------------------------------


def _meta(s: Settings, name: str, component: str | None = None, **extra: Any) -> Obj:
    labels = {"app.kubernetes.io/name": "chainyard", "app.kubernetes.io/part-of": "chainyard"}
    if component:
        labels["app.kubernetes.io/component"] = component
        labels["app.kubernetes.io/instance"] = name
    return {"name": name, "namespace": s.namespace, "labels": labels, **extra}


def _selector(name: str) -> Obj:
    return {"app.kubernetes.io/name": "chainyard", "app.kubernetes.io/instance": name}


def _skips(*checks: str) -> Obj:
    return {f"checkov.io/skip{i}": f"{c}={SKIPS[c]}" for i, c in enumerate(checks, 1)}


def _namespace(s: Settings) -> Obj:
    meta = _meta(s, s.namespace)
    del meta["namespace"]
    # Pod Security Admission: the restricted profile, which every pod here meets.
    meta["labels"]["pod-security.kubernetes.io/enforce"] = "restricted"
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": meta}


def _service_account(s: Settings) -> Obj:
    # The services never call the Kubernetes API: no token in their pods.
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _meta(s, "chainyard"),
        "automountServiceAccountToken": False,
    }


def _config_map(s: Settings, name: str, text: str) -> Obj:
    # Named after its content and immutable: a new config is a new ConfigMap, which rolls the
    # Deployments that name it; the old one stays until pruned (docs/KUBERNETES.md).
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(s, name),
        "immutable": True,
        "data": {"chainyard.toml": text.rstrip("\n")},
    }


def _network_policy(s: Settings) -> Obj:
    # Nothing calls into chainyard's pods but scrapers and probes (metrics port) and the
    # gateway's clients; they call out to NATS and providers (egress left open: providers may
    # be anywhere).
    ports = [{"port": p, "protocol": "TCP"} for p in (METRICS_PORT, GATEWAY_PORT)]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(s, "chainyard"),
        "spec": {
            "podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "chainyard"}},
            "policyTypes": ["Ingress"],
            "ingress": [{"ports": ports}],
        },
    }


def _gateway_service(s: Settings) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(s, "chainyard-gateway", "gateway"),
        "spec": {
            "type": "ClusterIP",
            "selector": _selector("chainyard-gateway"),
            "ports": [{"name": "http", "port": GATEWAY_PORT, "targetPort": "http"}],
        },
    }


def _secret_env(var: str, secret: str, key: str) -> Obj:
    return {"name": var, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def _deployment(
    s: Settings,
    *,
    name: str,
    component: str,
    args: list[str],
    port: int,
    grace_s: int,
    scale: Scale,
    region: str | None,
    env: list[Obj],
    config_map: str,
    replicas: int | None,
    pool: str | None = None,
    nats_url_key: str = "url",  # the key of `s.nats_secret` with this service's NATS URL
) -> Obj:
    port_name = "http" if port == GATEWAY_PORT else "metrics"
    labels = {**_selector(name), "app.kubernetes.io/part-of": "chainyard"}
    labels["app.kubernetes.io/component"] = component
    if pool is not None:
        labels["chainyard.dev/pool"] = label_value(pool)
    probe = {"httpGet": {"path": "/healthz", "port": port_name}, "timeoutSeconds": 5}
    container = {
        "name": component,
        "image": s.image_ref,
        "imagePullPolicy": "IfNotPresent",
        "args": args,
        "env": [
            _secret_env("CHAINYARD_NATS", s.nats_secret, nats_url_key),
            {"name": "OTEL_SERVICE_NAME", "value": f"chainyard-{component}"},
            *env,
        ],
        "ports": [{"name": port_name, "containerPort": port, "protocol": "TCP"}],
        # Alive: the service's event loop answers. A loop stuck for a minute is restarted.
        "livenessProbe": {**probe, "periodSeconds": 10, "failureThreshold": 6},
        # Started: up to 10 minutes, the liveness probe waits. Routers and workers answer at
        # once; the gateway opens its port once NATS answers, which may be down at start.
        "startupProbe": {**probe, "periodSeconds": 5, "failureThreshold": 120},
        # Ready: NATS connected, streams and consumers bound, the provider reachable or its
        # breaker known (docs/KUBERNETES.md).
        "readinessProbe": {
            **probe,
            "httpGet": {"path": "/readyz", "port": port_name},
            "periodSeconds": 5,
            "failureThreshold": 3,
        },
        "resources": {
            "requests": {"cpu": scale.cpu_request, "memory": scale.memory_request},
            "limits": {"cpu": scale.cpu_limit, "memory": scale.memory_limit},
        },
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": UID,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    pod: Obj = {
        "serviceAccountName": "chainyard",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": grace_s,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": UID,
            "fsGroup": UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": config_map}},
            {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
        ],
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": "kubernetes.io/hostname",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": _selector(name)},
            }
        ],
    }
    if region:
        pod["nodeSelector"] = {REGION_LABEL: region}
    spec: Obj = {
        "selector": {"matchLabels": _selector(name)},
        "revisionHistoryLimit": 5,
        # A new pod is ready before an old one drains: capacity never dips during a rollout.
        "strategy": {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
        },
        "template": {"metadata": {"labels": labels}, "spec": pod},
    }
    if replicas is not None:
        spec["replicas"] = replicas
    meta = _meta(s, name, component, annotations=_skips("CKV_K8S_15", "CKV_K8S_35", "CKV_K8S_43"))
    if pool is not None:
        meta["labels"]["chainyard.dev/pool"] = label_value(pool)
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta, "spec": spec}


def _pdb(
    s: Settings, name: str, *, min_available: int | None = None, max_unavailable: int = 1
) -> Obj:
    # Voluntary disruptions (node drains) take one worker at a time, which drains its slots;
    # the router and gateway keep one replica up.
    spec: Obj = {"selector": {"matchLabels": _selector(name)}}
    if min_available is not None:
        spec["minAvailable"] = min_available
    else:
        spec["maxUnavailable"] = max_unavailable
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(s, name),
        "spec": spec,
    }


def _scaled_object(s: Settings, config: Config, w: Workload) -> Obj:
    """KEDA's nats-jetstream scaler on the pool's consumer: lag = num_pending + num_ack_pending;
    replicas = ceil(lag / lagThreshold) within [min, max]; lagThreshold = the pool's slots, so
    each replica is offered what it can run at once."""
    topo = config.topology
    threshold = w.scale.lag_threshold or w.slots
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": _meta(s, w.name),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": w.name},
            "minReplicaCount": w.scale.min_replicas,
            "maxReplicaCount": w.scale.max_replicas,
            "pollingInterval": 15,
            "cooldownPeriod": 300,  # idle this long before scaling to zero (min_replicas 0)
            "triggers": [
                {
                    "type": "nats-jetstream",
                    "metadata": {
                        "natsServerMonitoringEndpoint": s.nats_monitoring,
                        "account": s.nats_account,
                        "stream": topo.work.name,
                        "consumer": topo.pool_consumer(w.pool).durable,
                        "lagThreshold": str(threshold),
                        "activationLagThreshold": "0",
                    },
                }
            ],
        },
    }


# -- output ----------------------------------------------------------------------------------


def _sorted(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _sorted(v[k]) for k in sorted(v)}
    if isinstance(v, list):
        return [_sorted(x) for x in v]
    return v


def file_name(obj: Obj) -> str:
    return f"{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"


def kustomization(objs: list[Obj]) -> Obj:
    return {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [file_name(o) for o in objs],
    }


HEADER_START = "# Rendered by `chainyard deploy k8s`"
HEADER = (
    HEADER_START + " from {source}; do not edit: render again, or\n"
    "# overlay your changes with kustomize (docs/KUBERNETES.md).\n"
)


def to_files(objs: list[Obj], source: str) -> dict[str, str]:
    """File name -> YAML text: one object a file, and kustomization.yaml listing them."""
    head = HEADER.format(source=source)
    files = {file_name(o): head + to_yaml(_sorted(o)) for o in objs}
    files["kustomization.yaml"] = head + to_yaml(kustomization(objs))
    return files


def to_stream(objs: list[Obj], source: str) -> str:
    """One YAML stream (`kubectl apply -f -`), in apply order."""
    return HEADER.format(source=source) + "".join("---\n" + to_yaml(_sorted(o)) for o in objs)
