"""`chainyard deploy k8s`: the rendered objects pass the three validators (docs/KUBERNETES.md).

- core objects against the Kubernetes API schemas of K8S_VERSION (kubernetes-validate, strict:
  an unknown field is an error);
- ScaledObjects against KEDA's CRD schema kept in deploy/k8s/schemas (jsonschema);
- checkov over the rendered folder and deploy/Dockerfile: no failed check, every skip with a
  reason. checkov lives in its own venv (`make checkov`, a prerequisite of `make test`).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from chainyard.contracts import PoolConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "deploy" / "chainyard.toml"
K8S_VERSION = "1.33.0"
KEDA_CRD = ROOT / "deploy" / "k8s" / "schemas" / "keda-scaledobject-v2.20.2.yaml"
CHECKOV = Path(os.environ.get("CHECKOV", ROOT / ".venv-checkov" / "bin" / "checkov"))
HAS_REGION = "region" in PoolConfig.__struct_fields__  # the `scale` branch adds it

# Several LLM pools (one scaled to zero, one with a name Kubernetes cannot take as is), provider
# keys, tool pools with and without settings, regions when the config has them.
RICH = f"""
strategy = "balanced"
tools = ["weather", "search"]

[[deployments]]
name = "gpt-eu"
pool = "openai-eu"
model = "gpt-4o-mini"

[[deployments]]
name = "claude"
pool = "Anthropic_Main.1"
model = "claude-3-5-haiku"
provider = "anthropic"

[[deployments]]
name = "local"
pool = "gpu"
model = "llama"

[[pools]]
name = "openai-eu"
provider = "openai"
base_url = "https://api.openai.com/v1"
api_key_env = "OPENAI_API_KEY"
slots = 200
timeout_s = 120
{'region = "eu-west-1"' if HAS_REGION else ""}
[pools.scale]
min_replicas = 2
max_replicas = 40
memory_limit = "2Gi"

[[pools]]
name = "Anthropic_Main.1"
provider = "anthropic"
base_url = "https://api.anthropic.com"
api_key_env = "ANTHROPIC_API_KEY"
slots = 32
timeout_s = 600
{'region = "us-east-1"' if HAS_REGION else ""}

[[pools]]
name = "gpu"
provider = "openai"
base_url = "http://vllm.inference.svc:8000/v1"
slots = 8
[pools.scale]
min_replicas = 0
max_replicas = 4
lag_threshold = 16

[[tool_pools]]
name = "weather"
timeout_s = 20
[tool_pools.scale]
min_replicas = 0
max_replicas = 3
"""


def deploy(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "chainyard.cli", "deploy", "k8s", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def render_dir(config: Path, out: Path, *extra: str) -> dict[str, Any]:
    """Render into `out`; the objects by file name (kustomization.yaml included)."""
    done = deploy("--config", config, "--tools", "chainyard.demo:tools", "--out", out, *extra)
    assert done.returncode == 0, done.stderr
    assert "min_replicas" not in done.stderr, done.stderr  # a pool at zero is fine now
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted(out.glob("*.yaml"))}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, Any]]]:
    """The demo config and the rich one, each rendered once into its own folder."""
    base = tmp_path_factory.mktemp("k8s")
    rich = base / "rich.toml"
    rich.write_text(RICH)
    return {
        "demo": (base / "demo", render_dir(DEMO, base / "demo")),
        "rich": (base / "rich", render_dir(rich, base / "rich", "--namespace", "agents")),
    }


def objects(files: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in files.values() if o["kind"] == kind}


def keda_schema() -> dict[str, Any]:
    crd = yaml.safe_load(KEDA_CRD.read_text())
    (v,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    return v["schema"]["openAPIV3Schema"]


@pytest.mark.parametrize("which", ["demo", "rich"])
def test_every_object_passes_the_kubernetes_and_keda_schemas(which: str, rendered) -> None:
    _out, files = rendered[which]
    kustomization = files.pop("kustomization.yaml")
    assert sorted(kustomization["resources"]) == sorted(files), "kustomization lists every file"
    keda = jsonschema.Draft7Validator(keda_schema())
    kinds = set()
    for name, obj in files.items():
        kinds.add(obj["kind"])
        if obj["kind"] == "ScaledObject":
            errors = [f"{list(e.absolute_path)}: {e.message}" for e in keda.iter_errors(obj)]
            assert not errors, f"{name}: {errors}"
        else:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    assert kinds == {
        "Namespace",
        "ServiceAccount",
        "ConfigMap",
        "NetworkPolicy",
        "Service",
        "Deployment",
        "PodDisruptionBudget",
        "ScaledObject",
    }


def test_the_validators_refuse_a_broken_object(rendered) -> None:
    """Each validator says no to what it must: else a pass above would prove nothing."""
    _, files = rendered["demo"]
    dep = json.loads(json.dumps(objects(files, "Deployment")["chainyard-router"]))
    dep["spec"]["template"]["spec"]["containers"][0]["livenessProb"] = {}  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSION, strict=True)
    so = json.loads(json.dumps(objects(files, "ScaledObject")["chainyard-pool-flaky"]))
    so["spec"]["minReplicaCount"] = "none"
    del so["spec"]["scaleTargetRef"]["name"]
    assert len(list(jsonschema.Draft7Validator(keda_schema()).iter_errors(so))) == 2


def test_workers_and_their_scaling_follow_the_config(rendered) -> None:
    out, files = rendered["rich"]
    config = load_config(out.parent / "rich.toml")
    deps, scaled = objects(files, "Deployment"), objects(files, "ScaledObject")
    pools = {
        d["spec"]["template"]["metadata"]["labels"].get("chainyard.dev/pool"): n
        for n, d in deps.items()
    }
    # One Deployment per pool and per tool pool, beside router and gateway.
    want = {"openai-eu", "gpu", "tool.weather", "tool.search"}
    assert want <= set(pools)
    # + Anthropic_Main.1, the gateway and the routers (one per region, when there are regions)
    assert len(deps) == 5 + 1 + (2 if HAS_REGION else 1)
    odd = [n for n in deps if n.startswith("chainyard-pool-anthropic-main-1-")]
    assert len(odd) == 1, "a pool name Kubernetes cannot take is made a DNS label, kept apart"
    for name, so in scaled.items():
        assert so["spec"]["scaleTargetRef"]["name"] == name and name in deps
        trig = so["spec"]["triggers"][0]
        assert trig["type"] == "nats-jetstream"
        assert (
            trig["metadata"]["stream"] == "CY_WORK" and trig["metadata"]["account"] == "CHAINYARD"
        )
        assert "replicas" not in deps[name]["spec"], "KEDA owns the replica count"
        pod = deps[name]["spec"]["template"]["spec"]
        pool = deps[name]["spec"]["template"]["metadata"]["labels"]["chainyard.dev/pool"]
        args = pod["containers"][0]["args"]
        served = args[args.index("--pool") + 1]
        # The consumer KEDA reads is the one the worker binds (Topology.pool_consumer).
        assert trig["metadata"]["consumer"] == config.topology.pool_consumer(served).durable
        if served.startswith("tool."):
            timeout, slots = config.tool_pool(served.removeprefix("tool.")).timeout_s, 64
            sc = config.tool_pool(served.removeprefix("tool.")).scale
        else:
            p = config.pool(served)
            timeout, slots, sc = p.timeout_s, p.slots, p.scale
            assert pool == p.name or pool.startswith("anthropic-main-1-")
        assert trig["metadata"]["lagThreshold"] == str(sc.lag_threshold or slots)
        assert (so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]) == (
            sc.min_replicas,
            sc.max_replicas,
        )
        # Long enough to finish a call in flight (the pool's timeout), then report it.
        assert pod["terminationGracePeriodSeconds"] >= math.ceil(timeout) + 30
        limits = pod["containers"][0]["resources"]["limits"]
        assert limits["memory"] == sc.memory_limit
    assert scaled["chainyard-pool-gpu"]["spec"]["minReplicaCount"] == 0  # scale to zero
    assert scaled["chainyard-pool-gpu"]["spec"]["triggers"][0]["metadata"]["lagThreshold"] == "16"
    grace = deps["chainyard-pool-openai-eu"]["spec"]["template"]["spec"]
    assert grace["terminationGracePeriodSeconds"] == 150
    if HAS_REGION:
        sel = grace.get("nodeSelector", {})
        assert sel == {"topology.kubernetes.io/region": "eu-west-1"}
        assert "nodeSelector" not in deps["chainyard-pool-gpu"]["spec"]["template"]["spec"]
        # A router per region, placed there and told its region.
        for region in ("eu-west-1", "us-east-1"):
            pod = deps[f"chainyard-router-{region}"]["spec"]["template"]["spec"]
            assert pod["nodeSelector"] == {"topology.kubernetes.io/region": region}
            env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
            assert env["CHAINYARD_REGION"] == region
        assert "chainyard-router" not in deps


def test_provider_keys_are_secret_references_and_pods_are_locked_down(rendered) -> None:
    _, files = rendered["rich"]
    text = "\n".join(json.dumps(o) for o in files.values())
    for dep in objects(files, "Deployment").values():
        assert dep["metadata"]["namespace"] == "agents"
        pod = dep["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        for env in c["env"]:
            assert "value" not in env or env["name"] in ("OTEL_SERVICE_NAME", "CHAINYARD_REGION")
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    keys = objects(files, "Deployment")["chainyard-pool-openai-eu"]["spec"]["template"]["spec"]
    env = {e["name"]: e for e in keys["containers"][0]["env"]}
    assert env["OPENAI_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "chainyard-provider-keys",
        "key": "OPENAI_API_KEY",
    }
    assert "sk-" not in text
    # The gateway, facing the internet, connects as its own NATS user (deploy/accounts.conf,
    # `gateway`); the routers and workers as `services`.
    for name, dep in objects(files, "Deployment").items():
        env = {e["name"]: e for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
        key = "gateway-url" if name == "chainyard-gateway" else "url"
        assert env["CHAINYARD_NATS"]["valueFrom"]["secretKeyRef"] == {
            "name": "chainyard-nats",
            "key": key,
        }, name


def test_rendering_is_deterministic_and_prunes_its_own_stale_files(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    render_dir(DEMO, a)
    (b / "mine.yaml").parent.mkdir()
    (b / "mine.yaml").write_text("kind: Mine\n")  # an operator's file: left alone
    render_dir(DEMO, b)
    for p in a.iterdir():
        assert p.read_bytes() == (b / p.name).read_bytes(), p.name
    # A pool removed from the config: its files go, the operator's stays.
    smaller = tmp_path / "smaller.toml"
    smaller.write_text(DEMO.read_text().replace('name = "steady"', 'name = "steady2"'))
    render_dir(smaller, b)
    names = {p.name for p in b.iterdir()}
    assert "deployment-chainyard-pool-steady2.yaml" in names
    assert "deployment-chainyard-pool-steady.yaml" not in names and "mine.yaml" in names
    # The stream (stdout) carries the same objects.
    done = deploy("--config", DEMO, "--tools", "chainyard.demo:tools")
    assert done.returncode == 0, done.stderr
    streamed = [o for o in yaml.safe_load_all(done.stdout) if o]
    assert len(streamed) == len(list(a.glob("*.yaml"))) - 1


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    no_tools = deploy("--config", DEMO)
    assert no_tools.returncode == 2
    assert "--tools MODULE:ATTR" in no_tools.stderr and "Traceback" not in no_tools.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('[[pools]]\nname = "x"\n[pools.scale]\nmin_replicas = 5\nmax_replicas = 2\n')
    done = deploy("--config", bad)
    assert done.returncode == 2 and "min_replicas (5) is above max_replicas (2)" in done.stderr
    bad.write_text('[[pools]]\nname = "x"\n[pools.scale]\ncpu_limit = "lots"\n')
    done = deploy("--config", bad)
    assert done.returncode == 2 and "cpu_limit" in done.stderr
    done = deploy("--config", DEMO, "--tools", "m:t", "--namespace", "My_Space")
    assert done.returncode == 2 and "not a DNS label" in done.stderr
    done = deploy("--config", tmp_path / "missing.toml")
    assert done.returncode == 2 and "missing.toml" in done.stderr


def checkov(*target: str | Path) -> dict[str, Any]:
    # --skip-download: no call to the vendor's platform (the results do not depend on it).
    done = subprocess.run(
        [str(CHECKOV), *map(str, target), "-o", "json", "--skip-download"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "LOG_LEVEL": "ERROR"},
    )
    assert done.returncode in (0, 1), done.stderr[-2000:]
    report = json.loads(done.stdout)
    return report if isinstance(report, dict) else {"results": {}, "many": report}


@pytest.mark.skipif(
    not CHECKOV.exists() and not os.environ.get("CI"),
    reason="checkov is not installed: `make checkov` (make test does it)",
)
def test_checkov_finds_no_failed_check_and_every_skip_has_a_reason(rendered) -> None:
    assert CHECKOV.exists() or shutil.which("checkov"), "make checkov"
    reports = [checkov("-f", ROOT / "deploy" / "Dockerfile", "--framework", "dockerfile")]
    for which in ("demo", "rich"):
        reports.append(checkov("-d", rendered[which][0], "--framework", "kubernetes"))
    passed = 0
    for report in reports:
        results = report["results"]
        failed = [(c["check_id"], c["resource"]) for c in results.get("failed_checks", [])]
        assert not failed, failed
        for c in results.get("skipped_checks", []):
            reason = (c.get("check_result") or {}).get("suppress_comment", "")
            assert len(reason.strip()) > 20, f"{c['check_id']} skipped without a reason"
        passed += len(results.get("passed_checks", []))
    assert passed > 500  # the scan really ran its checks


def test_nats_helm_values_keep_the_durability_settings_and_the_accounts() -> None:
    """deploy/k8s/nats-values.yaml (the official chart's values): 3 nodes, JetStream on files,
    sync_interval always, monitoring on for KEDA, and deploy/accounts.conf as it is."""
    values = yaml.safe_load((ROOT / "deploy" / "k8s" / "nats-values.yaml").read_text())
    cfg = values["config"]
    assert cfg["cluster"] == {"enabled": True, "replicas": 3}
    js = cfg["jetstream"]
    assert js["enabled"] and js["fileStore"]["enabled"] and js["fileStore"]["pvc"]["enabled"]
    assert js["merge"]["sync_interval"] == "always"
    assert cfg["monitor"] == {"enabled": True, "port": 8222}
    assert cfg["merge"]["00$include"] == "accounts.conf"
    accounts = values["configMap"]["merge"]["data"]["accounts.conf"]
    assert accounts == (ROOT / "deploy" / "accounts.conf").read_text()
    # Every password the accounts name comes from a Secret, none is written here.
    env = values["container"]["env"]
    named = set(re.findall(r"password: \$(\w+)", accounts))
    assert {"CY_SERVICES_PASSWORD", "CY_GATEWAY_PASSWORD", "CY_TENANT_A_PASSWORD"} <= named
    for var in named:
        assert "secretKeyRef" in env[var]["valueFrom"], var


def test_every_rendered_command_is_one_the_cli_takes(rendered) -> None:
    """The containers' args parse with chainyard's own parser (the gateway's once it exists),
    and each service listens where its probes and Service look."""
    import importlib.util

    from chainyard.cli import parser

    has_gateway = importlib.util.find_spec("chainyard.gateway") is not None
    for which in ("demo", "rich"):
        for dep in objects(rendered[which][1], "Deployment").values():
            (c,) = dep["spec"]["template"]["spec"]["containers"]
            args = c["args"]
            port = c["ports"][0]["containerPort"]
            if args[0] == "gateway":
                assert args[args.index("--port") + 1] == str(port)
                assert args[args.index("--host") + 1] == "0.0.0.0"
                if not has_gateway:
                    continue
            parsed = parser().parse_args(args)
            assert parsed.config == "/etc/chainyard/chainyard.toml"
            if args[0] in ("router", "worker"):
                assert parsed.metrics_port == port
