"""Blocks waiting to be carried out, and the responder threads that carry them out.

Threads and ownership: the main loop puts Blocks in; each of the `workers` responder threads
takes one, runs it (BanManager.enforce: the ban record, then the kernel set,
hosts.deny, KILL_ROUTE, KILL_RUN_CMD) and hands the outcome to `done`, which posts it back to the
main loop. The queue is bounded: when every worker is stuck in a hanging KILL_ROUTE and the queue
is full, a new block is refused at once (counted, and said once a minute) instead of piling up
without bound; detection goes on, and the engine forgets the refused block so the host's next
hit tries again. Nothing else runs on these threads: the tick and admin requests have their own.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

from portsentry.core.actions import Block

QUEUE_SIZE = 1024
WORKERS = 4
# Seconds queued blocks may still start once the daemon stops. Past that, the rest are given
# up: run four at a time behind hanging commands they would outlast any stop timeout (systemd's
# and the SysV script's 45 s), and a SIGKILL then cleans nothing up.
STOP_GRACE = 5.0

# True: done; False: failed; None: refused before any step ran (BAN_RATE_LIMIT's kernel slots).
Outcome = Callable[[Block, bool | None, BaseException | None], None]


class BlockQueue:
    def __init__(self, carry_out: Callable[[Block], bool | None], done: Outcome, log: Callable[[str], None],
                 workers: int = WORKERS, size: int = QUEUE_SIZE) -> None:
        self._carry_out = carry_out
        self._done = done
        self._log = log
        self._queue: queue.Queue[Block | None] = queue.Queue(maxsize=size)
        self._threads = [threading.Thread(target=self._work, name=f"responder-{n}", daemon=True)
                         for n in range(workers)]
        self.refused = 0
        self._refused_said_at = float("-inf")
        self._refused_unsaid = 0
        self._lock = threading.Lock()
        self._closed = False  # main thread only, like submit

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def submit(self, block: Block) -> bool:
        """Queue `block`; False (and counted) when the queue is full, False (and said) once the
        queue is closed: its workers are gone, and a block queued then was never run."""
        if self._closed:
            self._log("adminalert: ERROR: 1 block(s) not started: the daemon is stopping")
            return False
        try:
            self._queue.put_nowait(block)
            return True
        except queue.Full:
            pass
        with self._lock:
            self.refused += 1
            self._refused_unsaid += 1
            now = time.monotonic()
            say = now - self._refused_said_at >= 60.0
            if say:
                count, self._refused_unsaid, self._refused_said_at = self._refused_unsaid, 0, now
        if say:
            self._log(f"adminalert: ERROR: {count} block(s) not started: {self._queue.maxsize} blocks are "
                      "already waiting (are KILL_ROUTE or KILL_RUN_CMD hanging?); detection goes on")
        return False

    @property
    def full(self) -> bool:
        """True when submit would refuse (queue full, or closed)."""
        return self._closed or self._queue.full()

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def close(self, timeout: float | None = None) -> None:
        """Stop: blocks queued start for STOP_GRACE seconds more, those still waiting then are
        not started (and said); blocks under way finish (each bounded by COMMAND_TIMEOUT)."""
        self._closed = True
        grace_end = time.monotonic() + STOP_GRACE
        while (not self._queue.empty() and time.monotonic() < grace_end
               and any(thread.is_alive() for thread in self._threads)):
            time.sleep(0.05)
        dropped = 0
        while True:
            try:
                dropped += self._queue.get_nowait() is not None
            except queue.Empty:
                break
        if dropped:
            self._log(f"adminalert: ERROR: {dropped} block(s) not started: the daemon is stopping")
        for _thread in self._threads:
            self._queue.put(None)
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            if thread.is_alive():
                thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def _work(self) -> None:
        while True:
            block = self._queue.get()
            if block is None:
                return
            try:
                succeeded: bool | None = self._carry_out(block)
                error: BaseException | None = None
            except Exception as failure:  # a responder bug must not lose the outcome
                succeeded, error = False, failure
            self._done(block, succeeded, error)
