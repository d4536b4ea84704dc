"""One fleet decision (a ban or a lift made by one host), its wire form in a Redis Stream entry,
and its HMAC-SHA256 signature. Pure: no clock, no socket, no file.

The wire form is one line of text, `1|host|epoch|seq|kind|address|expires|at|reason`, signed as
a whole; the stream entry holds it in field `d` and the hex signature in field `s`. Every entry
read from Redis is untrusted (anyone who can write to Redis can write any bytes), so `decode`
checks the signature before it parses anything and then accepts exactly one spelling of every
field; everything else is a `BadDecision` whose `reason` is the metric label.

`epoch` and `seq` order one host's decisions: `seq` is the id of the change in that host's ban
store, `epoch` when that host's fleet state was made (a new state directory starts a new epoch).
Receivers refuse a decision older than one they already took from the same host, so a signed
entry copied back into the stream later (a replay) cannot lift a newer ban.
"""

from __future__ import annotations

import hmac
import math
import re
import socket
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import Literal

from portsentry.core.addresses import canonical
from portsentry.core.probe import IPAddress

VERSION = "1"
Kind = Literal["ban", "lift"]
KINDS: tuple[Kind, ...] = ("ban", "lift")
# A host id is a host name or a label an admin picks; it lands in logs and the ban store.
HOST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", re.ASCII)
MAX_REASON = 120
MAX_PAYLOAD = 512  # far above any real decision (an IPv6 address, a reason): a bound for the parser
# Ban expiries from here on (the year 2477) are forever, both ways: the wire takes no time past
# 10**12, and nf_tables refuses (ERANGE) a timeout of 2**64 ns (584 years) or more, failing the
# whole batch of bans it came in. Absolute, so every host turns one expiry into the same ban.
ENDLESS_FROM = 16e9
_INTEGER = rb"(0|[1-9][0-9]{0,18})"
_TIME = rb"(?:0|[1-9][0-9]{0,11})\.[0-9]{6}"  # seconds since 1970, to the microsecond
# version|host|epoch|seq|kind|address|expires|at|reason (printable ASCII without '|')
_PAYLOAD = re.compile(
    rb"1\|([A-Za-z0-9][A-Za-z0-9._-]{0,63})\|" + _INTEGER + rb"\|" + _INTEGER + rb"\|(ban|lift)\|"
    rb"([0-9A-Fa-f:.]{2,45})\|(-|" + _TIME + rb")\|(" + _TIME + rb")\|([\x20-\x7b\x7d\x7e]{0,120})")
_DOMAIN = b"portsentry-fleet-v1\0"
FIELD_DATA = b"d"
FIELD_SIGNATURE = b"s"


class BadDecision(ValueError):
    """An entry that must not be applied; `reason` is one of unsigned, bad_signature, malformed."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Decision:
    host: str  # who decided (FLEET_HOST_ID of the origin)
    epoch: int
    seq: int
    kind: Kind
    address: IPAddress
    expires: float | None  # a ban's end, seconds since 1970 (None: forever); None for a lift
    at: float  # when the origin decided
    reason: str = ""

    def __post_init__(self) -> None:
        if not HOST_ID.fullmatch(self.host):
            raise ValueError(f"fleet host id {self.host!r}: letters, digits, '.', '_', '-', at most 64")
        if self.kind not in KINDS:
            raise ValueError(f"decision kind {self.kind!r}")
        if self.kind == "lift" and self.expires is not None:
            raise ValueError("a lift has no expiry")
        if self.address != canonical(self.address):
            raise ValueError(f"{self.address} is not in canonical form")
        for value in (self.at, self.expires):
            if value is not None and not (math.isfinite(value) and 0 <= value < 1e12):
                raise ValueError(f"time {value!r} out of range")
        if not (0 <= self.epoch < 10**19 and 0 <= self.seq < 10**19):
            raise ValueError("epoch and seq are whole numbers below 10**19")

    def payload(self) -> bytes:
        reason = _clean(self.reason)
        expires = "-" if self.expires is None else f"{self.expires:.6f}"
        return (f"{VERSION}|{self.host}|{self.epoch}|{self.seq}|{self.kind}|{self.address.compressed}|"
                f"{expires}|{self.at:.6f}|{reason}").encode("ascii")


def reachable(expires: float | None) -> float | None:
    """A ban's expiry as the fleet carries and applies it: None (forever) from ENDLESS_FROM on."""
    return None if expires is None or expires >= ENDLESS_FROM else expires


def _clean(text: str) -> str:
    """A reason as the wire takes it: printable ASCII without '|', at most MAX_REASON."""
    return "".join(c if " " <= c <= "~" and c != "|" else "?" for c in text)[:MAX_REASON]


def sign(key: bytes, fleet: str, payload: bytes) -> bytes:
    """The hex HMAC-SHA256 of `payload` under `key`, bound to the fleet's name, so a decision
    signed for one fleet means nothing in another that shares the key."""
    return hmac.digest(key, _DOMAIN + fleet.encode("utf-8") + b"\0" + payload, "sha256").hex().encode("ascii")


def encode(decision: Decision, key: bytes, fleet: str) -> dict[bytes, bytes]:
    """The stream entry's fields for `decision`, signed."""
    payload = decision.payload()
    return {FIELD_DATA: payload, FIELD_SIGNATURE: sign(key, fleet, payload)}


def pack(decision: Decision, key: bytes, fleet: str) -> bytes:
    """One value holding the decision and its signature (the active-bans hash stores these)."""
    payload = decision.payload()
    return payload + b"\n" + sign(key, fleet, payload)


def unpack(value: bytes, key: bytes, fleet: str) -> Decision:
    """`pack` reversed, with the same checks as `decode`."""
    payload, _, signature = value.partition(b"\n")
    return decode({FIELD_DATA: payload, FIELD_SIGNATURE: signature}, key, fleet)


def decode(fields: object, key: bytes, fleet: str) -> Decision:
    """A verified Decision from an untrusted stream entry, or BadDecision. Never raises anything
    else, whatever `fields` holds."""
    if not isinstance(fields, dict):
        raise BadDecision("malformed", "not a set of fields")
    payload = fields.get(FIELD_DATA)
    signature = fields.get(FIELD_SIGNATURE)
    if not isinstance(payload, bytes) or len(payload) > MAX_PAYLOAD:
        raise BadDecision("malformed", "no decision text, or too long")
    if not isinstance(signature, bytes) or not signature:
        raise BadDecision("unsigned", "no signature")
    if not hmac.compare_digest(signature, sign(key, fleet, payload)):
        raise BadDecision("bad_signature", "the signature does not match the fleet key")
    # Signed with our key, so written by a host of the fleet; still parsed strictly, since a
    # host running another version may spell things differently.
    return parse(payload)


def parse(payload: bytes) -> Decision:
    """The Decision in a payload (signature already checked); BadDecision("malformed") for
    anything but the one spelling `Decision.payload` writes. One regular expression over the
    bytes: a joining host parses 100,000 of these."""
    match = _PAYLOAD.fullmatch(payload)
    if match is None:
        raise BadDecision("malformed", f"not a version {VERSION} decision")
    host, epoch, seq, kind, address_text, expires_text, at_text, reason = match.groups()
    if kind == b"lift" and expires_text != b"-":
        raise BadDecision("malformed", "a lift has no expiry")
    try:
        return Decision(host.decode(), int(epoch), int(seq), "ban" if kind == b"ban" else "lift",
                        _address(address_text.decode()),
                        None if expires_text == b"-" else float(expires_text), float(at_text),
                        reason.decode())
    except ValueError as error:
        raise BadDecision("malformed", str(error)) from None


def _address(text: str) -> IPAddress:
    """Only the canonical spelling: one address has one text, so two hosts never disagree.
    inet_pton, then the text it gives back, is five times faster than ip_address()."""
    family = socket.AF_INET6 if ":" in text else socket.AF_INET
    try:
        packed = socket.inet_pton(family, text)
    except OSError:
        raise BadDecision("malformed", "bad address") from None
    address: IPAddress = IPv4Address(packed) if family == socket.AF_INET else IPv6Address(packed)
    if (family == socket.AF_INET and socket.inet_ntop(family, packed) != text) or (
            family == socket.AF_INET6 and address.compressed != text) or canonical(address) != address:
        raise BadDecision("malformed", "address not in canonical form")
    return address
