"""Encoders and decoders, built once (msgspec decoders are cheap to use, costly to build)."""

from __future__ import annotations

import hashlib

import msgspec

from ._chain import Chain
from ._control import Cancel, Replay, Timer
from ._messages import Assignment, Event, Heartbeat, StepEvent
from ._state import ChainState

encoder = msgspec.json.Encoder()
encode = encoder.encode

chain_decoder = msgspec.json.Decoder(Chain)


def chain_digest(data: bytes) -> str:
    """Who a chain is, beyond its id: the first 32 hex digits of the SHA-256 of the bytes it was
    submitted as, leading and trailing whitespace aside (a file sent with and without its last
    newline is one chain). Terminal events carry it, so a submitter (in any language: it hashes
    what it sent) tells its chain's end from the end of another chain sent under that id."""
    return hashlib.sha256(data.strip()).hexdigest()[:32]


assignment_decoder = msgspec.json.Decoder(Assignment)
event_decoder = msgspec.json.Decoder(Event)
step_event_decoder = msgspec.json.Decoder(StepEvent)
heartbeat_decoder = msgspec.json.Decoder(Heartbeat)
state_decoder = msgspec.json.Decoder(ChainState)
cancel_decoder = msgspec.json.Decoder(Cancel)
replay_decoder = msgspec.json.Decoder(Replay)
timer_decoder = msgspec.json.Decoder(Timer)

DecodeError = msgspec.DecodeError
ValidationError = msgspec.ValidationError
# Everything decoding untrusted bytes can raise (msgspec lets bad UTF-8 in a key through as
# UnicodeDecodeError): catch this tuple wherever a message comes in.
BadMessage = (DecodeError, ValidationError, UnicodeDecodeError)
