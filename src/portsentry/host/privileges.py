"""Giving up root's other powers: the daemon keeps only the capabilities that its sensors, bans
and reloads need, in every set from which it or a command it runs could get the rest back.

Why. PortSentry runs as root for its whole life, and it runs commands built from the
configuration (KILL_ROUTE, KILL_RUN_CMD, KILL_ROUTE_UNDO) through /bin/sh. Full root there means
that a flaw in the daemon, or in a command it runs, can rewrite /etc/shadow, load kernel
modules or ptrace anything. Under systemd the unit already limits the capabilities; this module
does the same for every other way of starting the daemon (SysV init, a shell, --daemon).

What is kept (KEPT), and why each:
- CAP_NET_ADMIN: nftables/ipset/route bans (netlink and the ipset/ip tools), NFLOG capture,
  SO_RCVBUFFORCE on capture sockets.
- CAP_NET_RAW: AF_PACKET capture, opened again on every reload; iptables run by KILL_ROUTE.
- CAP_NET_BIND_SERVICE: -tcp/-udp ports below 1024, bound again on reload.
Not kept: CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER, CAP_CHOWN. As uid 0 the daemon
owns what it writes: hosts.deny (rewritten in place, so its owner root and mode 0644 stay and
no directory in /etc needs writing), STATE_DIR, the history and blocked files, /run/portsentry.
The owner's permission bits are enough there, and fchmod() of a file the daemon just created
needs no CAP_FOWNER. A file or directory owned by another user, or without the owner's write
bit (a hosts.deny set to 0444), is refused as it would be for any user: fix its owner or mode,
or keep CAP_DAC_OVERRIDE with KEEP_CAPABILITIES.

Which sets. Permitted and effective (the daemon itself); inheritable, and with it the ambient
set; and the bounding set, which matters most: a process running as uid 0 gets its whole
bounding set back as permitted on execve() (root's file capabilities count as "all"), so
without it KILL_ROUTE's /bin/sh would be full root again. Dropping from the bounding set needs
CAP_SETPCAP, so that comes first. Started as another user (file capabilities, or ambient ones
under a unit's User=), it lowers all but the bounding set, which needs no privilege.

When: before the daemon opens anything or starts a thread, not once its sockets are open.
Linux keeps capabilities per thread: capset() and PR_CAPBSET_DROP change the calling thread
only, and a thread started earlier (the responder pool that runs KILL_ROUTE, the metrics
server) would keep root's full set and pass it to every command it starts. Dropping first costs
nothing: a reload opens every socket again with only the kept set, so opening them cannot need
more.

KEEP_CAPABILITIES adds capabilities to the kept set for a KILL_RUN_CMD that needs them (names
as in capabilities(7)), or "all" to keep everything as 1.2 did.

Raw system calls through ctypes (capget, capset, prctl), so no libcap dependency.
"""

from __future__ import annotations

import ctypes
import os
import re
import threading
from dataclasses import dataclass
from typing import Final

# capabilities(7), in number order: CAPABILITY_NAMES[n] is capability n.
CAPABILITY_NAMES: Final[tuple[str, ...]] = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK",
    "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE", "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE", "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG",
    "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
)
CAPABILITIES: Final[dict[str, int]] = {name: number for number, name in enumerate(CAPABILITY_NAMES)}

KEPT: Final[frozenset[int]] = frozenset(
    CAPABILITIES[name] for name in ("CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_NET_BIND_SERVICE")
)
KEEP_ALL: Final = "all"

# <linux/capability.h> and <linux/prctl.h>
_LINUX_CAPABILITY_VERSION_3: Final = 0x20080522
_PR_CAPBSET_READ: Final = 23
_PR_CAPBSET_DROP: Final = 24
_CAP_LAST_CAP_FILE: Final = "/proc/sys/kernel/cap_last_cap"


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


# Version 3 carries 64 capabilities as two 32-bit halves, low half first.
_CapDataPair = _CapData * 2


def capability_name(number: int) -> str:
    return CAPABILITY_NAMES[number] if number < len(CAPABILITY_NAMES) else f"capability {number}"


def names(caps: frozenset[int] | int) -> str:
    """'CAP_NET_ADMIN CAP_NET_RAW' for a set or a bit mask, in number order; 'none' when empty."""
    numbers = sorted(caps) if isinstance(caps, frozenset) else [n for n in range(64) if caps >> n & 1]
    return " ".join(capability_name(n) for n in numbers) or "none"


def mask(caps: frozenset[int]) -> int:
    return sum(1 << n for n in caps)


def parse_keep(value: str | None) -> frozenset[int] | None:
    """What KEEP_CAPABILITIES keeps: KEPT plus the names listed (CAP_DAC_OVERRIDE or dac_override,
    blank- or comma-separated), or None for "all" (drop nothing). ValueError names a bad word."""
    words = re.split(r"[\s,]+", (value or "").strip())
    words = [word for word in words if word]
    if [word.lower() for word in words] == [KEEP_ALL]:
        return None
    kept = set(KEPT)
    for word in words:
        name = word.upper()
        name = name if name.startswith("CAP_") else "CAP_" + name
        if name not in CAPABILITIES:
            raise ValueError(f"{word!r} is not a capability (names as in capabilities(7), "
                             f"e.g. CAP_DAC_OVERRIDE, or {KEEP_ALL!r})")
        kept.add(CAPABILITIES[name])
    return frozenset(kept)


@dataclass(frozen=True)
class CapabilitySets:
    """One thread's capability sets as bit masks (bit n = capability n)."""

    effective: int
    permitted: int
    inheritable: int
    bounding: int


def read_status(path: str = "/proc/thread-self/status") -> CapabilitySets:
    """The Cap* lines of a /proc status file (of a thread, or of a process's main thread)."""
    found: dict[str, int] = {}
    with open(path, encoding="ascii", errors="replace") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("CapEff", "CapPrm", "CapInh", "CapBnd"):
                found[key] = int(value.strip(), 16)
    return CapabilitySets(found["CapEff"], found["CapPrm"], found["CapInh"], found["CapBnd"])


class _Kernel:
    """The three system calls, raising OSError with errno on failure."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._capget = libc.capget
        self._capset = libc.capset
        self._prctl = libc.prctl
        for call in (self._capget, self._capset):
            call.argtypes = (ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData))
            call.restype = ctypes.c_int
        self._prctl.argtypes = (ctypes.c_int,) + (ctypes.c_ulong,) * 4
        self._prctl.restype = ctypes.c_int

    @staticmethod
    def _check(result: int, what: str) -> int:
        if result < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"{what}: {os.strerror(code)}")
        return result

    def last_cap(self) -> int:
        try:
            with open(_CAP_LAST_CAP_FILE, encoding="ascii") as handle:
                return int(handle.read())
        except (OSError, ValueError):
            # /proc/sys hidden (e.g. ProcSubset=pid): ask the kernel cap by cap until EINVAL.
            last = 0
            while last < 63 and self._prctl(_PR_CAPBSET_READ, last + 1, 0, 0, 0) >= 0:
                last += 1
            return last

    def get(self) -> CapabilitySets:
        header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
        data = _CapDataPair()
        self._check(self._capget(ctypes.byref(header), data), "capget")
        bounding = 0
        for cap in range(self.last_cap() + 1):
            if self._check(self._prctl(_PR_CAPBSET_READ, cap, 0, 0, 0), "PR_CAPBSET_READ"):
                bounding |= 1 << cap

        def whole(field: str) -> int:
            return int(getattr(data[0], field)) | int(getattr(data[1], field)) << 32

        return CapabilitySets(whole("effective"), whole("permitted"), whole("inheritable"), bounding)

    def drop_bounding(self, cap: int) -> None:
        self._check(self._prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0), f"PR_CAPBSET_DROP {capability_name(cap)}")

    def set(self, effective: int, permitted: int, inheritable: int) -> None:
        header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
        low = 0xFFFFFFFF
        data = _CapDataPair(
            _CapData(effective & low, permitted & low, inheritable & low),
            _CapData(effective >> 32, permitted >> 32, inheritable >> 32),
        )
        self._check(self._capset(ctypes.byref(header), data), "capset")


def refusal() -> str | None:
    """Why this process cannot be the daemon, or None: another user than root holding none of
    KEPT can bind no low port, open no capture, make no ban (a start without sudo), where 1.2
    refused anyone but root. A user given them (file capabilities, a unit's User= with
    AmbientCapabilities=) may run it. None when the kernel cannot be asked: the start says what
    fails."""
    euid = os.geteuid()
    if euid == 0:
        return None
    try:
        permitted = _Kernel().get().permitted
    except (OSError, AttributeError):
        return None
    if permitted & mask(KEPT):
        return None
    return (f"You need to be root to run this (uid {euid} holds none of {names(KEPT)}: run it as root, "
            "or give it those capabilities)")


def lacks(name: str, status_path: str = "/proc/thread-self/status") -> bool:
    """Whether this thread surely does not hold capability `name` now: an admin command the
    kernel would refuse says so before it starts, rather than half way. False when /proc cannot
    be read: the command then says what fails."""
    try:
        effective = read_status(status_path).effective
    except (OSError, KeyError, ValueError):
        return False
    return not effective >> CAPABILITIES[name] & 1


@dataclass(frozen=True)
class DropResult:
    """What restrict() did. `message` is one line for the log; `ok` means it belongs in the
    verbose log only (the drop happened, or was switched off on purpose)."""

    ok: bool
    message: str


def restrict(keep: frozenset[int] | None) -> DropResult:
    """Limit this thread (and so every thread and process it starts afterwards) to `keep` in the
    effective, permitted, inheritable and bounding sets; None keeps everything. Call it before
    any other thread exists. Never raises: a failure is a result to log, and the daemon goes on
    with what it has."""
    if keep is None:
        return DropResult(True, "adminalert: KEEP_CAPABILITIES is \"all\": capabilities are not dropped")
    euid = os.geteuid()
    try:
        kernel = _Kernel()
        before = kernel.get()
        wanted = mask(keep)
        # Bounding first: PR_CAPBSET_DROP needs CAP_SETPCAP, which capset() then gives up. Not
        # as another user, who seldom has CAP_SETPCAP; but its file or ambient capabilities are
        # still lowered below, which needs no privilege (and takes the ambient set with them).
        for cap in range(64):
            if euid == 0 and before.bounding >> cap & 1 and not wanted >> cap & 1:
                kernel.drop_bounding(cap)
        after = CapabilitySets(before.effective & wanted, before.permitted & wanted,
                               before.inheritable & wanted, before.bounding & wanted)
        if (after.effective, after.permitted, after.inheritable) != (
                before.effective, before.permitted, before.inheritable):
            kernel.set(after.effective, after.permitted, after.inheritable)
        now = kernel.get()
    except (OSError, AttributeError) as error:  # AttributeError: a libc without capget/capset
        detail = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        return DropResult(False, f"adminalert: ERROR: could not drop capabilities ({detail}); "
                          "going on with the capabilities it has")
    bounding = now.bounding if euid == 0 else 0
    if bounding & ~wanted or now.permitted & ~wanted:
        return DropResult(False, "adminalert: ERROR: could not drop capabilities: still have "
                          f"{names((bounding | now.permitted) & ~wanted)}")
    others = threading.active_count() - 1
    if others:
        # A bug in the caller, not the host: say so rather than claim every thread is limited.
        return DropResult(False, f"adminalert: ERROR: capabilities dropped in one thread only; "
                          f"{others} other thread(s) started earlier keep theirs")
    if euid != 0:
        return DropResult(False, f"adminalert: not running as root (uid {euid}): capabilities limited "
                          f"to {names(now.permitted)}; the bounding set is left as it is")
    return DropResult(True, f"adminalert: capabilities limited to {names(now.permitted)}")
