"""Fixtures: a real nats-server per test (free port, fresh store), and helpers to wait on events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from chainyard.runtime.nats import Bus, open_bus
from chainyard.runtime.server import NatsServer


@pytest.fixture
async def nats_server() -> AsyncIterator[NatsServer]:
    async with NatsServer() as server:
        yield server


@pytest.fixture
async def bus(nats_server: NatsServer) -> AsyncIterator[Bus]:
    b = await open_bus(nats_server.url, name="test")
    yield b
    await b.close()


@pytest.fixture
async def stop() -> AsyncIterator[asyncio.Event]:
    ev = asyncio.Event()
    yield ev
    ev.set()
