"""Every holder of a ban (the store, the kernel set) keeps the same end for it: a ban the store
lists must be in force in the kernel for as long as the store lists it."""

from __future__ import annotations

from ipaddress import ip_address

from portsentry.core.actions import Block, Step, StepKind
from portsentry.core.probe import KIND_SYN, Mode, Probe
from portsentry.responders.classic import ClassicResponder
from tests.unit.bans.test_lifecycle import manager

A = ip_address("198.18.0.2")


def native_block(source=A) -> Block:
    return Block(Probe(source=source, port=0, mode=Mode.TCP, kind=KIND_SYN), (Step(StepKind.NATIVE, ""),))


def test_a_shorter_block_of_a_banned_address_leaves_the_kernel_timeout_at_the_stored_end(tmp_path):
    # `portsentry block A --for 60` while A is banned for an hour: the store keeps the later end
    # (the longer ban holds), but the kernel was given 60 s, so A was let in again after a minute
    # while `list` showed it banned for another 59 and the engine took its scans as
    # "already blocked".
    bans, kernel, lines, _commands = manager(tmp_path, base=3600)
    responder = ClassicResponder(bans.hosts_deny, lines.append, 1.0, clock=lambda: 100.0)
    assert bans.enforce(native_block(), responder, duration=3600.0, now=0.0)
    assert bans.enforce(native_block(), responder, duration=60.0, now=100.0)
    ban = bans.store.get(A)
    assert ban is not None and ban.expires == 3600.0
    assert kernel.held[A] == 3500.0


def test_a_timed_block_of_a_ban_for_ever_leaves_the_kernel_element_without_timeout(tmp_path):
    bans, kernel, lines, _commands = manager(tmp_path)
    responder = ClassicResponder(bans.hosts_deny, lines.append, 1.0, clock=lambda: 100.0)
    assert bans.enforce(native_block(), responder, duration=None, now=0.0)
    assert bans.enforce(native_block(), responder, duration=60.0, now=100.0)
    ban = bans.store.get(A)
    assert ban is not None and ban.expires is None
    assert kernel.held[A] is None


def test_a_longer_block_lengthens_the_kernel_timeout(tmp_path):
    bans, kernel, lines, _commands = manager(tmp_path)
    responder = ClassicResponder(bans.hosts_deny, lines.append, 1.0, clock=lambda: 100.0)
    assert bans.enforce(native_block(), responder, duration=60.0, now=0.0)
    assert bans.enforce(native_block(), responder, duration=7200.0, now=10.0)
    assert kernel.held[A] == 7200.0
