"""Subjects, streams, consumers and KV buckets: every NATS name chainyard uses, in one place.

These are plain data (no nats-py import) so that a client in any language can read the same
facts from the docs, and the runtime turns them into nats-py configs.
"""

from __future__ import annotations

from msgspec import Struct

MINUTE_S = 60.0
DAY_S = 24 * 60 * MINUTE_S
INTAKE_DUPLICATE_WINDOW_S = 0.1  # nats-server refuses less than 100 ms

# The streams a message can be dead-lettered from (`cy.dlq.<source>`).
DLQ_SOURCES = ("intake", "events", "control", "timers", "work")


class Subjects(Struct, frozen=True, kw_only=True):
    """Subject builders for one deployment prefix (default `cy`)."""

    prefix: str = "cy"

    def submit(self, tenant: str) -> str:
        return f"{self.prefix}.submit.{tenant}"

    def work(self, pool: str) -> str:
        return f"{self.prefix}.work.{pool}"

    def event(self, tenant: str, chain_id: str, kind: str) -> str:
        return f"{self.prefix}.events.{tenant}.{chain_id}.{kind}"

    def chain_events(self, tenant: str, chain_id: str) -> str:
        return f"{self.prefix}.events.{tenant}.{chain_id}.>"

    def delta(self, tenant: str, chain_id: str, step_id: str) -> str:
        return f"{self.prefix}.delta.{tenant}.{chain_id}.{step_id}"

    def cancel(self, tenant: str, chain_id: str) -> str:
        return f"{self.prefix}.cancel.{tenant}.{chain_id}"

    def control(self, tenant: str, chain_id: str, verb: str) -> str:
        """`verb`: "cancel", "signal.<name>" or "replay"."""
        return f"{self.prefix}.control.{tenant}.{chain_id}.{verb}"

    def timer(self, tenant: str, chain_id: str, step_id: str) -> str:
        return f"{self.prefix}.timer.{tenant}.{chain_id}.{step_id}"

    @property
    def all_control(self) -> str:
        return f"{self.prefix}.control.*.*.>"

    def deadline(self, tenant: str, chain_id: str) -> str:
        """A chain's deadline timer: a subject (and consumer) of its own, see `Topology`."""
        return f"{self.prefix}.deadline.{tenant}.{chain_id}"

    def deadline_schedule(self, tenant: str, chain_id: str, due_at_ms: int | str) -> str:
        """Where a chain's deadline waits until due: a message schedule (`Topology.timers`)
        that the server publishes to `deadline(...)` at the deadline. No consumer reads it.
        A subject per deadline: the roll-up that removes it when the chain ends first can
        only ever remove that one, never a later chain's under the same id (`"*"`: any)."""
        return f"{self.prefix}.schedule.deadline.{tenant}.{chain_id}.{due_at_ms}"

    @property
    def all_timers(self) -> str:
        return f"{self.prefix}.timer.>"

    @property
    def all_deadlines(self) -> str:
        return f"{self.prefix}.deadline.>"

    @property
    def all_schedules(self) -> str:
        return f"{self.prefix}.schedule.>"

    @property
    def all_cancel(self) -> str:
        return f"{self.prefix}.cancel.*.*"

    # Wildcards the services subscribe to.
    @property
    def all_submit(self) -> str:
        return f"{self.prefix}.submit.*"

    @property
    def all_work(self) -> str:
        return f"{self.prefix}.work.>"

    @property
    def all_events(self) -> str:
        return f"{self.prefix}.events.>"

    @property
    def step_events(self) -> str:
        return f"{self.prefix}.events.*.*.step.>"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}.dlq.>"

    def dlq_subject(self, source: str) -> str:
        return f"{self.prefix}.dlq.{source}"

    @staticmethod
    def tenant_of_submit(subject: str) -> str:
        return subject.rsplit(".", 1)[-1]


class StreamDef(Struct, frozen=True, kw_only=True):
    name: str
    subjects: list[str]
    retention: str  # "limits" | "workqueue"
    max_age_s: float = 0.0
    duplicate_window_s: float = 2 * MINUTE_S
    max_msg_size: int = -1
    max_bytes: int = -1
    allow_direct: bool = False  # direct gets by subject: a tenant may read its own events
    allow_msg_schedules: bool = False  # messages the server publishes later (nats-server 2.12+)
    allow_msg_ttl: bool = False  # messages with a TTL of their own (nats-server 2.11+)


class ConsumerDef(Struct, frozen=True, kw_only=True):
    durable: str
    filter_subject: str
    ack_wait_s: float
    max_deliver: int
    max_ack_pending: int


class KvDef(Struct, frozen=True, kw_only=True):
    bucket: str
    ttl_s: float = 0.0
    history: int = 1
    allow_msg_ttl: bool = False  # entries written with a TTL of their own (nats-server 2.11+)


class Topology(Struct, frozen=True, kw_only=True):
    """Every stream, consumer and bucket for one prefix.

    Duplicate windows outlast ack_wait x max_deliver, so a redelivered message re-emitted with
    the same `Nats-Msg-Id` is always recognised (NATS-NOTES: dedup only holds in the window).
    """

    subjects: Subjects = Subjects()
    replicas: int = 1
    work_ack_wait_s: float = 30.0
    work_max_deliver: int = 5  # a worker fails and dead-letters work delivered more often
    max_payload: int = 1024 * 1024

    @property
    def _tag(self) -> str:
        return self.subjects.prefix.upper().replace("-", "_")

    @property
    def intake(self) -> StreamDef:
        return StreamDef(
            name=f"{self._tag}_INTAKE",
            subjects=[self.subjects.all_submit, self.subjects.all_control],
            retention="workqueue",
            # The server's minimum: a message id is stream-wide, so it could let one tenant's
            # submission drop another's. Chain ids are deduplicated per tenant by the router's
            # create in KV `<tenant>.<chain>` instead (docs/DESIGN-NOTES.md).
            duplicate_window_s=INTAKE_DUPLICATE_WINDOW_S,
            max_msg_size=self.max_payload,
        )

    @property
    def work(self) -> StreamDef:
        return StreamDef(
            name=f"{self._tag}_WORK",
            subjects=[self.subjects.all_work],
            retention="workqueue",
            duplicate_window_s=10 * MINUTE_S,
            max_msg_size=self.max_payload,
        )

    @property
    def events(self) -> StreamDef:
        return StreamDef(
            name=f"{self._tag}_EVENTS",
            subjects=[self.subjects.all_events],
            retention="limits",
            max_age_s=7 * 24 * 60 * MINUTE_S,
            duplicate_window_s=10 * MINUTE_S,
            max_msg_size=self.max_payload,
            allow_direct=True,
        )

    @property
    def timers(self) -> StreamDef:
        return StreamDef(
            name=f"{self._tag}_TIMERS",
            subjects=[
                self.subjects.all_timers,
                self.subjects.all_deadlines,
                self.subjects.all_schedules,
            ],
            retention="workqueue",
            duplicate_window_s=10 * MINUTE_S,
            allow_msg_schedules=True,
            allow_msg_ttl=True,  # the roll-up that removes an ended chain's deadline expires
        )

    @property
    def dlq(self) -> StreamDef:
        return StreamDef(
            name=f"{self._tag}_DLQ",
            subjects=[self.subjects.dlq],
            retention="limits",
            max_age_s=30 * 24 * 60 * MINUTE_S,
        )

    @property
    def streams(self) -> list[StreamDef]:
        return [self.intake, self.work, self.events, self.timers, self.dlq]

    @property
    def intake_consumer(self) -> ConsumerDef:
        return ConsumerDef(
            durable="router-intake",
            filter_subject=self.subjects.all_submit,
            ack_wait_s=30.0,
            max_deliver=-1,  # a chain is never dropped: failures back off (runtime/consume.py)
            max_ack_pending=10_000,
        )

    @property
    def control_consumer(self) -> ConsumerDef:
        return ConsumerDef(
            durable="router-control",
            filter_subject=self.subjects.all_control,
            ack_wait_s=30.0,
            max_deliver=-1,
            max_ack_pending=10_000,
        )

    @property
    def timers_consumer(self) -> ConsumerDef:
        return ConsumerDef(
            durable="router-timers",
            filter_subject=self.subjects.all_timers,
            ack_wait_s=30.0,
            max_deliver=-1,  # every nak until the timer is due counts as a delivery
            max_ack_pending=100_000,
        )

    @property
    def deadlines_consumer(self) -> ConsumerDef:
        """Chain deadlines apart from the other timers. A deadline is a message schedule: the
        server delivers it when due. On a server without schedules it waits as a delayed nak,
        holding a slot until it fires: on their own consumer deadlines never hold back
        capacity, hedge and wait timers."""
        return ConsumerDef(
            durable="router-deadlines",
            filter_subject=self.subjects.all_deadlines,
            ack_wait_s=30.0,
            max_deliver=-1,
            max_ack_pending=1_000_000,  # running chains with a deadline, at most
        )

    @property
    def engine_consumer(self) -> ConsumerDef:
        return ConsumerDef(
            durable="router-engine",
            filter_subject=self.subjects.step_events,
            ack_wait_s=30.0,
            max_deliver=-1,  # an event must never be dropped; poison events go to the DLQ
            max_ack_pending=10_000,
        )

    def pool_consumer(self, pool: str, max_ack_pending: int = 20_000) -> ConsumerDef:
        return ConsumerDef(
            durable="pool-" + pool.replace(".", "_"),
            filter_subject=self.subjects.work(pool),
            ack_wait_s=self.work_ack_wait_s,
            # No server-side limit: JetStream would drop the message silently. A worker that
            # gets it for delivery > work_max_deliver fails the step and dead-letters it.
            max_deliver=-1,
            max_ack_pending=max_ack_pending,
        )

    @property
    def chains_kv(self) -> KvDef:
        return KvDef(bucket=f"{self.subjects.prefix}_chains".replace("-", "_"), allow_msg_ttl=True)

    @property
    def capacity_kv(self) -> KvDef:
        return KvDef(bucket=f"{self.subjects.prefix}_capacity".replace("-", "_"), ttl_s=30.0)

    @property
    def breakers_kv(self) -> KvDef:
        return KvDef(bucket=f"{self.subjects.prefix}_breakers".replace("-", "_"))

    @property
    def keys_kv(self) -> KvDef:
        """The gateway's API keys, hashed (chainyard/gateway/keys.py); services only."""
        return KvDef(bucket=f"{self.subjects.prefix}_keys".replace("-", "_"))

    @property
    def limits_kv(self) -> KvDef:
        """Per-key rpm/tpm/spend counters shared by gateway replicas (chainyard/gateway/limits.py).
        A counter untouched for two days (a revoked key's) ages out."""
        return KvDef(bucket=f"{self.subjects.prefix}_limits".replace("-", "_"), ttl_s=2 * DAY_S)

    @property
    def buckets(self) -> list[KvDef]:
        return [self.chains_kv, self.capacity_kv, self.breakers_kv, self.keys_kv, self.limits_kv]
