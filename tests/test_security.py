"""Security: NATS started with deploy/nats-secure.conf (TLS from a throwaway CA made here,
accounts.conf permissions). Tenant A cannot publish into B's intake, read B's events, B's inbox
replies or the JetStream API beyond its own reads (tests/test_tenant_permissions.py: all a tenant
may do and may not); a tenant named in a payload or header is ignored in favour of the
subject; provider API keys never appear in events, state, dead letters, logs or spans."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest
from aiohttp import web
from helpers import stop_all
from nats.aio.client import Client as NatsClient

from chainyard.client import Client
from chainyard.contracts import (
    Chain,
    ChainCompleted,
    ChainFailed,
    LlmStep,
    Message,
    Topology,
    encode,
    event_decoder,
    load_config,
)
from chainyard.ledger import read_stream
from chainyard.runtime.server import NatsServer
from chainyard.sandbox import SandboxConfig, SandboxServer

ROOT = Path(__file__).resolve().parent.parent
PASSWORDS = {
    "services": "svc-pw-test-only",
    "gateway": "gw-pw-test-only",
    "tenant-A": "a-pw-test-only",
    "tenant-B": "b-pw-test-only",
}
GOOD_KEY = "sk-live-GOODKEY-0123456789abcdefSECRET"
BAD_KEY = "sk-live-BADKEY-9876543210fedcbaSECRET"

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


def make_certs(d: Path) -> None:
    """A throwaway CA and a server certificate for 127.0.0.1/localhost (test-only, never kept)."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=cy-test-ca",
        "-keyout",
        "ca-key.pem",
        "-out",
        "ca.pem",
    )
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "server-key.pem",
        "-out",
        "server.csr",
    )
    run(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca-key.pem",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "ext.cnf",
        "-out",
        "server.pem",
    )


@dataclass
class Secure:
    server: NatsServer
    dir: Path

    def url(self, user: str) -> str:
        return f"tls://{user}:{PASSWORDS[user]}@127.0.0.1:{self.server.port}"

    @property
    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.dir / "ca.pem"))


@pytest.fixture
async def secure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Secure]:
    d = tmp_path / "nats"
    d.mkdir()
    make_certs(d)
    for name in ("nats-secure.conf", "accounts.conf"):
        shutil.copy(ROOT / "deploy" / name, d / name)
    (d / "tls.conf").write_text(
        f'tls {{ cert_file: "{d}/server.pem", key_file: "{d}/server-key.pem", '
        f'ca_file: "{d}/ca.pem", timeout: 2 }}\n'
    )
    monkeypatch.setenv("CY_SERVICES_PASSWORD", PASSWORDS["services"])
    monkeypatch.setenv("CY_GATEWAY_PASSWORD", PASSWORDS["gateway"])
    monkeypatch.setenv("CY_TENANT_A_PASSWORD", PASSWORDS["tenant-A"])
    monkeypatch.setenv("CY_TENANT_B_PASSWORD", PASSWORDS["tenant-B"])
    async with NatsServer(config_file=d / "nats-secure.conf") as server:
        yield Secure(server, d)


async def tenant(s: Secure, name: str, errors: list[str]) -> NatsClient:
    async def on_error(e: Exception) -> None:
        errors.append(str(e))

    return await nats.connect(
        s.url(f"tenant-{name}"),
        tls=s.tls,
        inbox_prefix=f"_INBOX_{name}",
        error_cb=on_error,
        max_reconnect_attempts=0,
        allow_reconnect=False,
    )


def one_step(cid: str, model: str = "m", text: str = "hi") -> Chain:
    return Chain(
        id=cid, steps=[LlmStep(id="a", model=model, messages=[Message(role="user", content=text)])]
    )


async def wait_error(errors: list[str], word: str) -> None:
    async def seen() -> None:
        while not any(word.lower() in e.lower() for e in errors):  # noqa: ASYNC110 - filled by error_cb
            await asyncio.sleep(0.02)

    try:
        await asyncio.wait_for(seen(), 5)
    except TimeoutError:  # say which wait it was, and what did come
        raise AssertionError(f"no error with {word!r} within 5 s; errors seen: {errors}") from None


async def test_plain_connection_refused_and_wrong_password_rejected(secure: Secure) -> None:
    with pytest.raises(Exception):  # noqa: B017 - TLS is required: the plain client cannot talk
        await nats.connect(
            f"nats://127.0.0.1:{secure.server.port}",
            allow_reconnect=False,
            max_reconnect_attempts=0,
            connect_timeout=2,
        )
    with pytest.raises(Exception):  # noqa: B017 - authorization violation
        await nats.connect(
            f"tls://tenant-A:wrong@127.0.0.1:{secure.server.port}",
            tls=secure.tls,
            allow_reconnect=False,
            max_reconnect_attempts=0,
            connect_timeout=2,
        )


@pytest.fixture
async def services_bus(secure: Secure) -> AsyncIterator[object]:
    nc = await nats.connect(secure.url("services"), tls=secure.tls)
    js = nc.jetstream()
    topo = Topology()
    from chainyard.runtime.nats import ensure_stream

    for sdef in topo.streams:
        await ensure_stream(js, sdef, 1)
    try:
        yield nc
    finally:
        await nc.close()


async def test_tenant_a_confined(secure: Secure, services_bus: NatsClient) -> None:
    s = secure
    svc = services_bus
    a_err: list[str] = []
    b_err: list[str] = []
    a = await tenant(s, "A", a_err)
    b = await tenant(s, "B", b_err)
    try:
        # A publishes its own intake: stored, with a PubAck on A's own inbox
        ack = await a.jetstream().publish(
            "cy.submit.A", encode(one_step("a-1")), headers={"Nats-Msg-Id": "a-1"}
        )
        assert ack.stream == "CY_INTAKE"
        # ... but not B's: refused, nothing stored
        await a.publish(
            "cy.submit.B", encode(one_step("a-into-b")), headers={"Nats-Msg-Id": "a-into-b"}
        )
        await a.flush()
        await wait_error(a_err, 'Permissions Violation for Publish to "cy.submit.B"')
        info = await svc.jetstream().stream_info("CY_INTAKE", subjects_filter="cy.submit.B")
        assert not info.state.subjects

        # A cannot subscribe to B's events, B's inbox, or the JetStream API
        for subject in ("cy.events.B.>", "_INBOX_B.>", "_INBOX.>", "$JS.API.>", "cy.events.>", ">"):
            a_err.clear()
            sub = await a.subscribe(subject)
            await a.flush()
            await wait_error(a_err, "Permissions Violation for Subscription")
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        # ... nor call it
        a_err.clear()
        with pytest.raises(Exception):  # noqa: B017 - no responders / timeout: no API for tenants
            await a.jetstream(timeout=1).stream_info("CY_EVENTS")

        # what B gets, A never sees: B's event and B's PubAck
        seen_by_a: list[str] = []

        async def spy(msg: object) -> None:
            seen_by_a.append(msg.subject)  # type: ignore[attr-defined]

        await a.subscribe("cy.events.A.>", cb=spy)
        await a.flush()
        await b.jetstream().publish(
            "cy.submit.B", encode(one_step("b-1")), headers={"Nats-Msg-Id": "b-1"}
        )
        got_b: asyncio.Queue[str] = asyncio.Queue()

        async def on_b(msg: object) -> None:
            got_b.put_nowait(msg.subject)  # type: ignore[attr-defined]

        await b.subscribe("cy.events.B.>", cb=on_b)
        await b.flush()

        # Core NATS delivers at most once, and here (nats-server 2.15.1, TLS) a subscription
        # whose flush has returned still misses, about one run in twenty, a message published
        # at once from another connection: the server stores it in CY_EVENTS but B never gets
        # it, while the next one arrives. So publish until B gets one, within 5 s.
        async def deliver() -> str:
            while True:
                await svc.publish("cy.events.B.b-1.chain.completed", b"{}")
                with contextlib.suppress(TimeoutError):
                    return await asyncio.wait_for(got_b.get(), 0.5)

        assert await asyncio.wait_for(deliver(), 5) == "cy.events.B.b-1.chain.completed"
        await a.flush()
        assert seen_by_a == []
    finally:
        await a.close()
        await b.close()


# -- end to end through the services -----------------------------------------------------------


def write_config(path: Path, sandbox_url: str) -> Path:
    path.write_text(f"""
max_attempts = 1
[[deployments]]
name = "good"
pool = "sim"
model = "m"
price = {{ input_per_mtok = 1.0, output_per_mtok = 1.0 }}
[[deployments]]
name = "bad"
pool = "badkey"
model = "m-bad"
price = {{ input_per_mtok = 1.0, output_per_mtok = 1.0 }}
[[pools]]
name = "sim"
provider = "openai"
base_url = "{sandbox_url}/v1"
api_key_env = "CY_TEST_GOOD_KEY"
[[pools]]
name = "badkey"
provider = "openai"
base_url = "{sandbox_url}/v1"
api_key_env = "CY_TEST_BAD_KEY"
""")
    return path


async def services_ready(s: Secure) -> None:
    """The router's intake consumer and a heartbeat of each pool exist."""
    svc = await nats.connect(s.url("services"), tls=s.tls)
    try:
        js = svc.jetstream()

        async def ready() -> None:
            while True:
                try:
                    await js.consumer_info("CY_INTAKE", "router-intake")
                    kv = await js.key_value("cy_capacity")
                    keys = await kv.keys()
                    if any(k.startswith("sim.") for k in keys) and any(
                        k.startswith("badkey.") for k in keys
                    ):
                        return
                except Exception:
                    pass
                await asyncio.sleep(0.1)

        await asyncio.wait_for(ready(), 60)
    finally:
        await svc.close()


@pytest.fixture
async def spans() -> AsyncIterator[tuple[str, list[bytes]]]:
    """An OTLP/HTTP receiver that keeps every export body (protobuf: strings stay readable)."""
    bodies: list[bytes] = []

    async def traces(request: web.Request) -> web.Response:
        bodies.append(await request.read())
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", bodies
    finally:
        await runner.cleanup()


async def test_keys_never_leak_and_subject_tenant_wins(
    secure: Secure, tmp_path: Path, spans: tuple[str, list[bytes]]
) -> None:
    s = secure
    endpoint, bodies = spans
    procs: list[tuple[asyncio.subprocess.Process, Path]] = []
    async with SandboxServer(SandboxConfig(api_key=GOOD_KEY)) as sandbox:
        cfg = write_config(tmp_path / "chainyard.toml", sandbox.url)
        env = dict(os.environ)
        env.update(
            {
                "CY_TEST_GOOD_KEY": GOOD_KEY,
                "CY_TEST_BAD_KEY": BAD_KEY,
                "PYTHONUNBUFFERED": "1",
                "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
                "OTEL_BSP_SCHEDULE_DELAY": "100",
                "SSL_CERT_FILE": str(s.dir / "ca.pem"),
            }
        )
        try:
            for role in (["router"], ["worker"]):
                log = tmp_path / f"{role[0]}.log"
                with log.open("wb") as out:
                    p = await asyncio.create_subprocess_exec(
                        sys.executable,
                        "-m",
                        "chainyard.cli",
                        "-v",
                        *role,
                        "--nats",
                        s.url("services"),
                        "--config",
                        str(cfg),
                        stdout=out,
                        stderr=asyncio.subprocess.STDOUT,
                        env=env,
                    )
                procs.append((p, log))
            await services_ready(s)
            a_err: list[str] = []
            a = await tenant(s, "A", a_err)
            try:
                client = Client(a, "A")
                # a tenant claimed in the payload (metadata) and in a header: both ignored
                chain = Chain(
                    id="claims-b",
                    metadata={"tenant": "B"},
                    steps=[
                        LlmStep(id="a", model="m", messages=[Message(role="user", content="hi")])
                    ],
                )
                sub_events: list[bytes] = []

                async def keep(msg: object) -> None:
                    sub_events.append(msg.data)  # type: ignore[attr-defined]

                await a.subscribe("cy.events.A.>", cb=keep)
                ended: asyncio.Future[object] = asyncio.get_running_loop().create_future()

                async def on_end(msg: object) -> None:
                    ev = event_decoder.decode(msg.data)  # type: ignore[attr-defined]
                    if isinstance(ev, ChainCompleted | ChainFailed) and not ended.done():
                        ended.set_result(ev)

                await a.subscribe("cy.events.A.claims-b.chain.>", cb=on_end)
                await a.flush()
                await a.jetstream().publish(
                    "cy.submit.A",
                    encode(chain),
                    headers={"Nats-Msg-Id": chain.id, "Cy-Tenant": "B", "tenant": "B"},
                )
                done = await asyncio.wait_for(ended, 60)
                assert isinstance(done, ChainCompleted), done
                assert done.tenant == "A"
                # a chain whose provider rejects the key (the sandbox echoes the key it got)
                bad = await client.run(one_step("badkey-1", model="m-bad"), timeout=60)
                assert isinstance(bad, ChainFailed), bad
                assert "401" in (bad.reason or "") or "key" in (bad.reason or "").lower()
            finally:
                await a.close()
        finally:
            await stop_all((p for p, _ in procs), grace_s=20)
    # read everything as the services user
    svc = await nats.connect(s.url("services"), tls=s.tls)
    try:
        js = svc.jetstream()
        topo = Topology()
        events = await read_stream(js, topo.events.name, topo.subjects.all_events)
        state = await read_stream(js, "KV_cy_chains", "$KV.cy_chains.>")
        dead = await read_stream(js, topo.dlq.name, topo.subjects.dlq)
    finally:
        await svc.close()
    subjects = {m.subject for m in events}
    assert any(x.startswith("cy.events.A.claims-b.") for x in subjects)
    assert not any(x.startswith("cy.events.B.") for x in subjects), subjects
    assert {m.subject for m in state} >= {"$KV.cy_chains.A.claims-b"}
    assert not any(m.subject.startswith("$KV.cy_chains.B.") for m in state)
    assert bodies, "no spans were exported"
    blobs: dict[str, bytes] = {
        **{f"event {m.subject}": m.data + repr(m.headers).encode() for m in events},
        **{f"state {m.subject}": m.data for m in state},
        **{f"dlq {m.subject}": m.data + repr(m.headers).encode() for m in dead},
        **{f"log {log.name}": log.read_bytes() for _, log in procs},
        **{f"span export {i}": b for i, b in enumerate(bodies)},
    }
    for key in (GOOD_KEY, BAD_KEY):
        for part in (key, key[-16:]):
            leaks = [name for name, blob in blobs.items() if part.encode() in blob]
            assert leaks == [], f"{part!r} found in {leaks}"
    assert load_config(cfg).pool("sim").api_key_env == "CY_TEST_GOOD_KEY"
