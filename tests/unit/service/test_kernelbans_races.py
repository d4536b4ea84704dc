"""The settling of the kernel's first-probe bans (maintenance thread) against a scan's ban and an
admin's unblock of the same address (responder and admin threads), each interleaving forced:
whatever the order, a ban on record is in the kernel and a ban in the kernel is on record."""

from __future__ import annotations

import threading
import time

from portsentry.core.actions import Block, Step, StepKind
from portsentry.core.probe import KIND_SYN, Mode, Probe, Protocol
from portsentry.responders.backend import Caught
from portsentry.responders.classic import ClassicResponder
from portsentry.service.kernelbans import KernelBans
from tests.unit.service.test_kernelbans import SCANNER, CatchingKernel, Listening, setup


def _scan(kb: KernelBans) -> threading.Thread:
    """The scanner's NFLOG copy reaching a responder: the ban lifecycle records and applies it."""
    probe = Probe(source=SCANNER, port=8080, mode=Mode.STCP, kind=KIND_SYN)
    block = Block(probe, (Step(StepKind.NATIVE, ""),))
    responder = ClassicResponder(kb.bans.hosts_deny, lambda _line: None, 1.0)
    return threading.Thread(target=kb.bans.enforce, args=(block, responder), kwargs={"now": time.time()})


def test_a_scans_ban_between_settlings_look_and_its_kernel_lift_stays_in_the_kernel(tmp_path) -> None:
    """Settling lifted a kernel ban (a service started on the port a moment ago) without taking
    the address's turn: a scan's ban of the address recorded and put in the kernel between its
    look at the store and its removal was taken out of the kernel again, leaving a record (and
    an engine saying "already blocked") with nothing in the kernel, for as long as the ban."""
    kb, kernel, _lines = setup(tmp_path)
    kernel.held = {SCANNER: 60.0}
    kernel.entries = [(SCANNER, Protocol.TCP, 8080)]
    scans: list[threading.Thread] = []

    class StartedMeanwhile(Listening):
        def confirm(self, port: int, now: float, flow: object = None) -> bool:
            scan = _scan(kb)
            scan.start()
            scan.join(0.3)  # it either ran now, between the look and the lift, or waits its turn
            scans.append(scan)
            return True  # the service is up now

    kb._listeners[Protocol.TCP] = StartedMeanwhile(Protocol.TCP, set())
    kb.settle(time.time())
    for scan in scans:
        scan.join(5.0)
    assert scans and not scans[0].is_alive()
    ban = kb.bans.store.get(SCANNER)
    recorded = ban is not None and ban.active(time.time())
    assert recorded and SCANNER in kernel.held, (ban, kernel.held)


def test_an_unblock_between_settlings_read_and_its_late_record_is_not_undone(tmp_path) -> None:
    """Settling read the caught entries, then an admin unblocked the address (its kernel ban and
    its caught entry went), and settling, going on from what it had read, recorded the ban late
    and put it back in the kernel: the unblock was undone, for BLOCK_TIME (for ever with 0)."""
    kb, kernel, lines = setup(tmp_path)
    kernel.held = {SCANNER: 60.0}
    kernel.entries = [(SCANNER, Protocol.TCP, 79)]
    kb.settle(100.0)
    unblocks: list[threading.Thread] = []

    class UnblockedAfterTheRead(CatchingKernel):
        def caught(self) -> list[Caught]:
            found = list(kernel.entries)
            if not unblocks:
                unblock = threading.Thread(target=kb.bans.lift, args=(SCANNER, 103.4, "unblocked by admin"))
                unblocks.append(unblock)
                unblock.start()
                unblock.join(5.0)
            return found

    kernel.__class__ = UnblockedAfterTheRead
    kb.settle(103.5)
    assert unblocks and not unblocks[0].is_alive()
    assert kernel.held == {} and kernel.entries == []
    assert kb.bans.store.get(SCANNER) is None and kb.recorded_late == 0, lines
