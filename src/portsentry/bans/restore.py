"""Start-up with many bans: put the stored bans back in force, fast, and say READY only then.

What is restored before READY=1: expired bans are lifted, the native set gets every active ban
in one batch (and loses what the store does not know, unless a clean stop vouched for it:
`_restore_native`), and hosts.deny gets every missing line of ours in one read and one write (a
million bans must not mean a million rewrites of the file). What is not: KILL_ROUTE re-runs. A
shell command per ban can take minutes for many bans (systemd's start timeout would kill the
service), so `rerun_routes` runs them afterwards on its own thread, a few at a time, and logs
each. They are needed only when the kernel forgot their effect, after a reboot or in a new
network namespace, told apart by the kernel identity remembered in STATE_DIR/kernel-id.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from portsentry.bans.lifecycle import BanManager, mode_of
from portsentry.bans.store import StoreError
from portsentry.core import messages
from portsentry.core.probe import IPAddress
from portsentry.responders.backend import BackendError, BanBackend
from portsentry.responders.hostsdeny import HostsDenyError
from portsentry.responders.substitute import substitute

RERUN_CONCURRENCY = 4
# Seconds the wall clock may lag the monotonic one between a stop and the next start before it
# counts as set back.
CLOCK_SLACK = 2.0

# SO_NETNS_COOKIE (Linux 5.14+): a 64-bit id the kernel never hands out twice while it runs.
SO_NETNS_COOKIE = getattr(socket, "SO_NETNS_COOKIE", 71)
_COOKIE = struct.Struct("=Q")


@dataclass(frozen=True)
class Restored:
    banned: list[bytes]  # every ban in force, as packed addresses (Engine.sync_bans takes them)
    # (address, port, mode) of each, for the KILL_ROUTE re-runs; empty when none are due.
    routes: list[tuple[IPAddress, int, str]]
    kernel_id_path: str | None = None
    kernel_id: str | None = None

    @property
    def rerun(self) -> bool:
        return bool(self.routes)


def restore_bans(bans: BanManager, now: float, kernel_id_path: str | None = None,
                 stop_path: str | None = None) -> Restored:
    """Everything that must be in force before READY; see the module docstring. A million bans
    are read as packed addresses and go to the kernel without an address object each; only
    the bans with a hosts.deny line, and the KILL_ROUTE re-runs when due, are read in full.
    `stop_path`: where remember_stop wrote what the last clean stop left (STATE_DIR/kernel-sync)."""
    trusted = _left_as_stopped(stop_path, bans) if stop_path is not None else False
    bans.expire(now)
    changed, current = _kernel_changed(kernel_id_path) if kernel_id_path is not None else (False, None)
    # Held against lifts from the read to the last line: the control socket already answers, and
    # an unblock in between was undone, its host back in the kernel with no record left.
    with bans.exclusive():
        active = bans.store.active_packed(now)
        _restore(bans, active, now, trusted)
    # Only bans KILL_ROUTE ran for here (ROUTE_MARK): a fleet peer's ban (bans.adopt), a kernel
    # ban recorded late while KILL_ROUTE was unset and any other ban made then never ran it, so a
    # reboot must not run it either; their lift runs no KILL_ROUTE_UNDO.
    routes = bans.store.active_routed(now) if changed and bans.policy.route else []
    # With nothing to re-run, rerun_routes returns at once and would not remember the kernel: a
    # first start without bans must still write it, or the next restart in the same namespace
    # re-runs every KILL_ROUTE made meanwhile.
    if changed and not routes and kernel_id_path is not None:
        _remember_kernel(kernel_id_path, current, bans.log)
    return Restored([packed for packed, _expires in active], routes, kernel_id_path, current)


def _restore(bans: BanManager, active: list[tuple[bytes, float | None]], now: float,
             trusted: bool = False) -> None:
    if bans.backend is not None:
        _restore_native(bans, bans.backend, active, now, trusted)
    lines = {line: address for address, line in bans.store.active_lines(now)}
    if lines:
        def own(appended: list[str]) -> None:
            try:
                bans.store.own_lines(((lines[line], line) for line in appended), now)
            except StoreError as error:  # appended anyway: the ban must be in force
                bans.log(messages.store_failed(str(error)))

        try:
            bans.hosts_deny.add_many(list(lines), on_append=own)
        except (HostsDenyError, OSError, ValueError) as error:
            bans.log(messages.config_error(f"cannot restore {len(lines)} hosts.deny lines: {error}"))


def _restore_native(bans: BanManager, backend: BanBackend, active: list[tuple[bytes, float | None]],
                    now: float, trusted: bool) -> None:
    """The native set made to hold the store's bans and nothing else: the store is the truth, and
    a kernel entry it lacks (its file deleted or restored from a backup, a record lost in a
    crash) stayed for ever with BLOCK_TIME 0 while `list` did not show it. Replacing the sets
    (BanBackend.replace_all) costs a third more than adding with a million bans, so it is done
    only when they may hold such an entry: not when they are empty (a reboot), nor when the last
    clean stop left them matching this very store (`trusted`, remember_stop); then the stored
    bans are only added. Never from an in-memory stand-in for a file that could not be opened:
    it knows no ban, and the kernel's are the only ones in force until the file is back."""
    def timed() -> Iterator[tuple[bytes, float | None]]:
        return ((packed, None if expires is None else (expires - now if expires - now > 1.0 else 1.0))
                for packed, expires in active)

    if bans.fallback_from is None and not trusted and _holds_any(backend):
        try:
            backend.replace_all(timed())
        except (BackendError, OSError) as error:  # then at least every stored ban goes in
            bans.log(messages.native_block_failed("(restore: replacing what the set held; adding "
                                                  "the stored bans instead)", backend.describe(), str(error)))
        else:
            bans.log(f"adminalert: {backend.name}: the ban sets now hold the {len(active)} bans of the "
                     "ban store and no other (the last stop was not clean, or the store changed since)")
            return
    if active:
        try:
            backend.restore_many(timed())
        except (BackendError, OSError) as error:
            bans.log(messages.native_block_failed("(restore)", backend.describe(), str(error)))


def _holds_any(backend: BanBackend) -> bool:
    try:
        return backend.holds_any()
    except (BackendError, OSError):
        return True  # unknown: replacing is right either way


def remember_stop(bans: BanManager, path: str) -> None:
    """At a clean stop, once nothing bans or lifts any more: the native sets hold what the store
    lists (every change went to both), so the next start may leave them as they are if neither
    the kernel nor the store changed meanwhile (restore_bans). Nothing is written when that is
    not known: records held in memory, a kernel removal that failed, an in-memory store."""
    if bans.backend is None or bans.fallback_from is not None or bans.kernel_unsure or bans.unsaved():
        return
    current = kernel_id()
    if current is None:
        return
    try:
        state = {"kernel": current, "store": bans.store.fingerprint(), "wall": time.time(),
                 "monotonic": time.monotonic()}
    except StoreError:
        return
    try:
        with open(path + ".new", "w", encoding="ascii") as handle:
            json.dump(state, handle)
        os.replace(path + ".new", path)
    except OSError as error:
        bans.log(messages.store_failed(f"{path}: {error.strerror or error}"))


def _left_as_stopped(path: str, bans: BanManager) -> bool:
    """Whether the native sets hold what the last clean stop left, matching the store: the same
    kernel (boot and network namespace), the store unchanged since (not replaced, restored from
    a backup, edited), and the wall clock not set back meanwhile (the store's expiry is wall-clock
    time, the kernel's timeouts are not, and before Linux 6.10 an add keeps an element's shorter
    timeout). The record is removed as it is read: a run that ends without a clean stop leaves
    none, and the next start replaces the sets."""
    try:
        with open(path, encoding="ascii") as handle:
            state = json.load(handle)
    except (OSError, ValueError):
        return False
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
    current = kernel_id()
    if current is None or not isinstance(state, dict) or state.get("kernel") != current:
        return False
    wall, monotonic = state.get("wall"), state.get("monotonic")
    if not (isinstance(wall, float) and isinstance(monotonic, float)):
        return False
    if time.time() - wall < time.monotonic() - monotonic - CLOCK_SLACK:
        return False  # set back
    try:
        return bool(state.get("store") == bans.store.fingerprint())
    except StoreError:
        return False


def rerun_routes(bans: BanManager, restored: Restored, concurrency: int = RERUN_CONCURRENCY,
                 stop: threading.Event | None = None) -> int:
    """KILL_ROUTE again for every restored ban, `concurrency` at a time (after READY, on its own
    thread); the kernel identity is remembered only once all ran, so a crash half-way re-runs
    them at the next start. Once `stop` is set (the daemon stops) none starts any more, and the
    next start runs them all again. Returns how many failed."""
    if not restored.rerun or bans.policy.route is None:
        return 0
    stop = stop or threading.Event()
    route = bans.policy.route
    bans.log(f"adminalert: re-running KILL_ROUTE for {len(restored.routes)} stored bans "
             f"(new boot or network namespace), {concurrency} at a time")

    def one(target: tuple[IPAddress, int, str]) -> bool:
        address, port, mode = target
        if stop.is_set():
            return False
        command = substitute(route, address, port, mode_of(mode))
        # In turn with lifts: a ban unblocked or expired since READY (its KILL_ROUTE_UNDO has run)
        # must not get its route back.
        with bans.while_banned(address, time.time()) as banned:
            if not banned:
                return True
            result = bans.run(command, bans.policy.command_timeout)
        if result.ok:
            bans.log(messages.blocked_via_route(str(address), command))
        else:
            bans.log(messages.route_failed(str(address), result.failure()))
        return result.ok

    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="route-rerun") as pool:
        failed = sum(not ok for ok in pool.map(one, restored.routes))
    if restored.kernel_id_path is not None and not stop.is_set():
        _remember_kernel(restored.kernel_id_path, restored.kernel_id, bans.log)
    return failed


def kernel_id() -> str | None:
    """Which kernel state we run against: the boot, and the network namespace; None when it
    cannot be known.

    Not the inode of /proc/self/ns/net: the kernel reuses those numbers, so a namespace deleted
    and created again (a container restart) looked like the same one and KILL_ROUTE was not
    re-run. The namespace cookie is unique for the life of the boot.
    """
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
            boot = handle.read().strip()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
            cookie = _COOKIE.unpack(probe.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, _COOKIE.size))[0]
    except (OSError, struct.error):
        return None
    return f"{boot} netns-cookie:{cookie}"


def _kernel_changed(path: str) -> tuple[bool, str | None]:
    """Whether the kernel differs from the one remembered at `path`, and the current id.

    Anything unknown counts as changed: re-running KILL_ROUTE at worst adds a rule twice, while
    skipping it leaves a recorded ban that is not in force.
    """
    current = kernel_id()
    if current is None:
        return True, None
    try:
        with open(path, encoding="ascii") as handle:
            previous: str | None = handle.read().strip()
    except (OSError, ValueError):
        previous = None
    return previous != current, current


def _remember_kernel(path: str, current: str | None, log: Callable[[str], None]) -> None:
    if current is None:
        return
    try:
        with open(path, "w", encoding="ascii") as handle:
            handle.write(current + "\n")
    except OSError as error:
        log(messages.store_failed(f"{path}: {error.strerror or error}"))
