"""The fleet connections' reply budget (fleet.budget) against arbitrary replies: a reply within
it reads exactly as redis-py's own parser reads it, one past it raises ReplyTooLarge and nothing
else, whatever its shape, for RESP3 and RESP2."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from redis._parsers import Encoder, _RESP2Parser, _RESP3Parser

from portsentry.fleet.budget import ELEMENT, BoundedRESP2, BoundedRESP3, ReplyTooLarge, at_most

Value = Any


def _resp(value: Value, three: bool) -> bytes:
    if isinstance(value, bytes):
        return b"$%d\r\n%s\r\n" % (len(value), value)
    if isinstance(value, int):
        return b":%d\r\n" % value
    if isinstance(value, dict):
        if not three:
            return _resp([item for pair in value.items() for item in pair], three)
        pairs = b"".join(_resp(k, three) + _resp(v, three) for k, v in value.items())
        return b"%%%d\r\n" % len(value) + pairs
    if value is None:
        return b"_\r\n" if three else b"$-1\r\n"
    return b"*%d\r\n" % len(value) + b"".join(_resp(item, three) for item in value)


def _cost(value: Value, three: bool) -> int:
    """What the budget counts for `value`, worked out apart from the code under test."""
    if isinstance(value, bytes):
        return ELEMENT + len(value)
    if isinstance(value, dict):
        inner = sum(_cost(k, three) + _cost(v, three) for k, v in value.items())
        return 2 * ELEMENT * len(value) + inner
    if isinstance(value, list):
        return ELEMENT * len(value) + sum(_cost(item, three) for item in value)
    if value is None and not three:
        return ELEMENT  # RESP2's null is a bulk string of length -1
    return 0


class _Connection:
    def __init__(self, sock: socket.socket) -> None:
        self._sock, self.socket_timeout = sock, 5.0
        self.encoder = Encoder("utf-8", "strict", False)  # type: ignore[no-untyped-call]


def _read(parser_class: type, data: bytes, limit: int | None = None) -> Value:
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(data)
        parser = parser_class(socket_read_size=4096)
        parser.on_connect(_Connection(ours))
        try:
            if limit is None:
                return parser.read_response()
            with at_most(limit):
                return parser.read_response()
        finally:
            parser.on_disconnect()


_LEAF = st.binary(max_size=300) | st.integers(-(2**63), 2**63 - 1) | st.none()
_REPLY = st.recursive(_LEAF, lambda inner: st.lists(inner, max_size=12)
                      | st.dictionaries(st.binary(max_size=20), inner, max_size=6), max_leaves=60)


@settings(max_examples=300, deadline=None)
@given(_REPLY, st.integers(0, 6000), st.booleans())
def test_a_reply_within_the_budget_reads_as_redis_py_reads_it_and_past_it_raises(reply, limit, three):
    data = _resp(reply, three)
    plain, bounded = (_RESP3Parser, BoundedRESP3) if three else (_RESP2Parser, BoundedRESP2)
    expected = _read(plain, data)
    try:
        got = _read(bounded, data, limit)
    except ReplyTooLarge:
        assert _cost(reply, three) > limit
    else:
        assert _cost(reply, three) <= limit and got == expected


def test_a_huge_header_is_refused_before_anything_is_read_for_it():
    headers = (b"$2000000000\r\n", b"*2000000000\r\n", b"%1000000000\r\n", b"*3\r\n$1\r\nx\r\n$99999999\r\n")
    for header in headers:
        try:
            _read(BoundedRESP3, header, 10**6)
        except ReplyTooLarge:
            continue
        raise AssertionError(f"{header!r} was taken")


def test_the_daemon_does_not_import_redis_py_without_a_fleet():
    """redis-py is the optional extra portsentry[fleet], imported only when a fleet is configured
    (README): the daemon's modules must load without it."""
    code = ("import sys, portsentry.service.daemon, portsentry.cli.run, portsentry.fleet.node; "
            "print(sorted(name for name in sys.modules if name.split('.')[0] == 'redis'))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env,
                          check=True)
    assert done.stdout.strip() == "[]", done.stdout
