"""deploy/compose.yaml parses and wires NATS, Jaeger v2, router and workers (docker cannot run
here, so this checks the file, the Dockerfile and the config the images use)."""

from __future__ import annotations

from pathlib import Path

import yaml

from chainyard.cli import parser
from chainyard.contracts import load_config

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_has_the_services() -> None:
    services = compose()["services"]
    assert {"nats", "jaeger", "router", "worker", "tools"} <= set(services)
    assert "-js" in services["nats"]["command"]
    jaeger = services["jaeger"]
    assert jaeger["image"].startswith("jaegertracing/jaeger:2.")
    published = {p.split(":")[0] for p in jaeger["ports"]}
    assert {"4317", "4318", "16686"} <= published


def test_services_export_to_jaeger_and_parse_as_cli_commands() -> None:
    services = compose()["services"]
    for name, service in (("router", "chainyard-router"), ("worker", "chainyard-worker")):
        s = services[name]
        env = s["environment"]
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318"
        assert env["OTEL_SERVICE_NAME"] == service
        assert s["build"]["dockerfile"] == "deploy/Dockerfile"
        args = parser().parse_args(s["command"])  # the image's entrypoint is `chainyard`
        assert args.command == name and args.metrics_port == 9464
        assert args.nats == "nats://nats:4222"
    assert services["tools"]["command"][services["tools"]["command"].index("--tools") + 1] == (
        "chainyard.demo:tools"
    )


def test_dockerfile_and_config() -> None:
    docker = (DEPLOY / "Dockerfile").read_text()
    assert docker.startswith("#") and "FROM python:3.11" in docker
    assert "COPY deploy/chainyard.toml /etc/chainyard/chainyard.toml" in docker
    assert 'ENTRYPOINT ["chainyard"]' in docker
    cfg = load_config(DEPLOY / "chainyard.toml")
    pools = {p.name for p in cfg.pools}
    assert pools == {d.pool for d in cfg.deployments}
    assert all("sandbox" in p.base_url for p in cfg.pools)
