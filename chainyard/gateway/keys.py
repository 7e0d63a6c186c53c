"""API keys: each maps to one tenant and carries its grants (models, rpm, tpm, spend per day).

A key is `cy-` + 43 random URL-safe characters (256 bits). Only its SHA-256 is stored, in the
KV bucket `cy_keys` under the key's public id (`key_` + 12 hex); the raw key is returned once by
`create_key` and never stored, logged or traced. A plain hash is enough (no slow KDF): the key is
random, not a password, so there is nothing to guess from its hash.

Every gateway replica holds a `KeyStore`: an in-memory map fed by a watch on the bucket, so
`authenticate` costs one hash and one dict lookup, and a create or revoke reaches every replica
as soon as NATS delivers the KV update (milliseconds; tests/test_gateway_keys.py asserts < 1 s).
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
from datetime import UTC, datetime
from typing import Annotated

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from chainyard.contracts import Topology
from chainyard.runtime.kv_view import KvView
from chainyard.runtime.nats import ensure_kv, retry_api

log = logging.getLogger("chainyard.gateway.keys")

KEY_PREFIX = "cy-"
KEY_ID_PREFIX = "key_"
TENANT_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # a NATS subject token, as chain ids are
KEY_ID_RE = re.compile(r"^key_[0-9a-f]{12}$")
MODEL_RE = re.compile(r"^[^\s,]{1,200}$")  # a step's `model`: a deployment's model or a group


class InvalidGrant(ValueError):
    """Bad input for a key (a tenant, model or limit that cannot be): the message says which."""


class Grant(msgspec.Struct, frozen=True, kw_only=True):
    """What a key may do: its tenant, the models or groups it may name (() = all), its limits."""

    key_id: str
    tenant: str
    models: tuple[str, ...] = ()
    rpm: int | None = None
    tpm: int | None = None
    spend_usd_per_day: float | None = None

    def allows(self, model: str) -> bool:
        return not self.models or model in self.models


class KeyRecord(msgspec.Struct, frozen=True, kw_only=True):
    """The stored form of a key: its grant, a label, when it was made, and the key's SHA-256."""

    key_id: str
    tenant: Annotated[str, msgspec.Meta(pattern=TENANT_RE.pattern)]
    key_sha256: str
    name: str = ""
    models: tuple[str, ...] = ()
    rpm: int | None = None
    tpm: int | None = None
    spend_usd_per_day: float | None = None
    created: str = ""  # ISO 8601, UTC

    def grant(self) -> Grant:
        return Grant(
            key_id=self.key_id,
            tenant=self.tenant,
            models=self.models,
            rpm=self.rpm,
            tpm=self.tpm,
            spend_usd_per_day=self.spend_usd_per_day,
        )


_record_decoder = msgspec.json.Decoder(KeyRecord)


def key_sha256(raw_key: str) -> str:
    return hashlib.sha256(raw_key.encode()).hexdigest()


def checked_grant(
    *,
    tenant: str,
    models: tuple[str, ...] = (),
    rpm: int | None = None,
    tpm: int | None = None,
    spend_usd_per_day: float | None = None,
) -> Grant:
    """The grant, or `InvalidGrant` naming what is wrong with it."""
    if not TENANT_RE.match(tenant):
        raise InvalidGrant(f"tenant {tenant!r}: 1 to 64 of A-Z a-z 0-9 _ - (it is a NATS token)")
    for m in models:
        if not MODEL_RE.match(m):
            raise InvalidGrant(f"model {m!r}: 1 to 200 characters, no spaces or commas")
    for label, n in (("rpm", rpm), ("tpm", tpm)):
        if n is not None and n < 1:
            raise InvalidGrant(f"{label} {n}: a limit is a positive whole number")
    if spend_usd_per_day is not None and not spend_usd_per_day > 0:
        raise InvalidGrant(f"spend per day {spend_usd_per_day}: a limit is a positive amount")
    return Grant(
        key_id="",
        tenant=tenant,
        models=tuple(dict.fromkeys(models)),
        rpm=rpm,
        tpm=tpm,
        spend_usd_per_day=spend_usd_per_day,
    )


async def open_keys_kv(js: JetStreamContext, topology: Topology | None = None) -> KeyValue:
    """The `cy_keys` bucket, created if this is the first process to need it."""
    topology = topology or Topology()
    return await retry_api(lambda: ensure_kv(js, topology.keys_kv, topology.replicas))


async def create_key(kv: KeyValue, grant: Grant, *, name: str = "") -> tuple[str, KeyRecord]:
    """Store a new key for `grant` (from `checked_grant`): (the raw key, shown once; its record)."""
    raw = KEY_PREFIX + secrets.token_urlsafe(32)
    while True:
        record = KeyRecord(
            key_id=KEY_ID_PREFIX + secrets.token_hex(6),
            tenant=grant.tenant,
            key_sha256=key_sha256(raw),
            name=name,
            models=grant.models,
            rpm=grant.rpm,
            tpm=grant.tpm,
            spend_usd_per_day=grant.spend_usd_per_day,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        try:
            await kv.create(record.key_id, msgspec.json.encode(record))
        except KeyWrongLastSequenceError:  # that id exists (1 in 2^48): draw another
            continue
        return raw, record


async def revoke_key(kv: KeyValue, key_id: str) -> tuple[str, int] | None:
    """Delete the key: (its tenant, the bucket revision that deleted it), or None if there is no
    such key."""
    if not KEY_ID_RE.match(key_id):
        return None
    try:
        entry = await kv.get(key_id)
    except (KeyNotFoundError, KeyDeletedError):
        return None
    try:
        tenant = _record_decoder.decode(entry.value or b"").tenant
    except msgspec.DecodeError:
        tenant = "?"  # a corrupt entry: revoking it is still right
    await kv.delete(key_id)
    # delete() answers True, not the revision: the bucket's last sequence is at least ours
    return tenant, (await kv.status()).stream_info.state.last_seq


class KeyStore(KvView):
    """Every key of the bucket in memory, kept current by a KV watch."""

    def __init__(self, kv: KeyValue, bucket: str = "cy_keys") -> None:
        super().__init__(kv, bucket, self._apply)
        self.records: dict[str, KeyRecord] = {}  # key id -> record
        self._by_hash: dict[str, Grant] = {}

    @classmethod
    async def open(cls, js: JetStreamContext, topology: Topology | None = None) -> KeyStore:
        """Load every key, then follow the bucket; returns once the load is complete."""
        topology = topology or Topology()
        kv = await open_keys_kv(js, topology)
        return await cls(kv, topology.keys_kv.bucket).start()

    def _apply(self, entry: KeyValue.Entry) -> None:
        old = self.records.pop(entry.key, None)
        if old is not None:
            self._by_hash.pop(old.key_sha256, None)
        if entry.operation in (KV_DEL, KV_PURGE) or not entry.value:
            return
        try:
            record = _record_decoder.decode(entry.value)
        except msgspec.DecodeError as e:  # a hand-edited entry: refuse that key, keep serving
            log.warning("key %s in %s is not a key record, ignored: %s", entry.key, entry.bucket, e)
            return
        self.records[record.key_id] = record
        self._by_hash[record.key_sha256] = record.grant()

    def authenticate(self, raw_key: str) -> Grant | None:
        """The key's grant; None for a key that is unknown, revoked or not a chainyard key."""
        if not raw_key.startswith(KEY_PREFIX):
            return None
        return self._by_hash.get(key_sha256(raw_key))
