"""Blocks wait in a bounded queue for the responder threads (issue 10.4)."""

from __future__ import annotations

import threading
from ipaddress import ip_address

from portsentry.core.actions import Block
from portsentry.core.probe import KIND_SYN, Mode, Probe
from portsentry.service import blockqueue
from portsentry.service.blockqueue import BlockQueue


def block(n: int) -> Block:
    return Block(Probe(ip_address(f"198.18.0.{n}"), 1, Mode.STCP, KIND_SYN), ())


def test_a_full_queue_refuses_at_once_says_so_once_and_detection_goes_on():
    release = threading.Event()
    outcomes: list[tuple[Block, bool | None]] = []
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
    outcomes: list[tuple[bool | None, BaseException | None]] = []

    def broken(b: Block) -> bool:
        raise RuntimeError("bug")

    queue = BlockQueue(broken, lambda b, ok, error: outcomes.append((ok, error)), lambda _t: None, workers=1)
    queue.start()
    queue.submit(block(1))
    queue.close(timeout=10)
    [(ok, error)] = outcomes
    assert ok is False and isinstance(error, RuntimeError)


def test_stopping_starts_no_more_blocks_after_the_grace_and_says_how_many_were_left(monkeypatch):
    # SIGTERM with KILL_ROUTE hanging and blocks queued: close() ran every queued block, each up
    # to COMMAND_TIMEOUT, four at a time (1024 queued at 30 s: two hours), so the service
    # manager's SIGKILL came first and nothing was cleaned up.
    release = threading.Event()
    carried: list[Block] = []
    said: list[str] = []

    started = threading.Event()

    def hang(b: Block) -> bool:
        carried.append(b)
        started.set()
        release.wait(10)  # the fallback only ends a test that would otherwise never end
        return True

    def log(text: str) -> None:
        said.append(text)
        if "not started" in text:
            release.set()  # the block under way finishes only once the others were given up

    queue = BlockQueue(hang, lambda b, ok, error: None, log, workers=1, size=8)
    queue.start()
    for n in range(5):
        assert queue.submit(block(n))
    assert started.wait(10)  # the first block is under way
    monkeypatch.setattr(blockqueue, "STOP_GRACE", 0.0, raising=False)
    queue.close()
    assert [str(b.probe.source) for b in carried] == ["198.18.0.0"]
    assert said == ["adminalert: ERROR: 4 block(s) not started: the daemon is stopping"]
