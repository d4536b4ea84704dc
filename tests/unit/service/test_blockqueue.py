"""Blocks wait in a bounded queue for the responder threads (issue 10.4)."""

from __future__ import annotations

import threading
from ipaddress import ip_address

from portsentry.core.actions import Block
from portsentry.core.probe import KIND_SYN, Mode, Probe
from portsentry.service.blockqueue import BlockQueue


def block(n: int) -> Block:
    return Block(Probe(ip_address(f"198.18.0.{n}"), 1, Mode.STCP, KIND_SYN), ())


def test_a_full_queue_refuses_at_once_says_so_once_and_detection_goes_on():
    release = threading.Event()
    outcomes: list[tuple[Block, bool]] = []
    said: list[str] = []

    def hang(b: Block) -> bool:  # every KILL_ROUTE hangs
        release.wait(10)
        return True

    queue = BlockQueue(hang, lambda b, ok, error: outcomes.append((b, ok)), said.append, workers=2, size=3)
    queue.start()
    accepted = [queue.submit(block(n)) for n in range(10)]
    # 2 taken by the workers (maybe not yet), 3 waiting: at least 5 of 10 are refused at once.
    assert accepted.count(False) >= 5 and queue.refused == accepted.count(False)
    assert len(said) == 1 and "blocks are already waiting" in said[0]
    release.set()
    queue.close(timeout=10)
    assert sorted(str(b.probe.source) for b, ok in outcomes) == sorted(
        f"198.18.0.{n}" for n, ok in enumerate(accepted) if ok)


def test_a_responder_that_raises_still_reports_its_outcome():
    outcomes: list[tuple[bool, BaseException | None]] = []

    def broken(b: Block) -> bool:
        raise RuntimeError("bug")

    queue = BlockQueue(broken, lambda b, ok, error: outcomes.append((ok, error)), lambda _t: None, workers=1)
    queue.start()
    queue.submit(block(1))
    queue.close(timeout=10)
    [(ok, error)] = outcomes
    assert ok is False and isinstance(error, RuntimeError)
