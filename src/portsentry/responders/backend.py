"""The interface every native ban backend (nftables, ipset, route) implements, the argv runner they
share, and the automatic choice between them.

Backends build argv lists and run them through a `Runner` without a shell; tests swap the runner
for a recorder and assert the exact commands ("golden commands"), so no test needs root to check
what a backend would do. Only `ipaddress` objects are accepted as addresses, and `address_text`
re-checks that at the point where an address becomes command text.
"""

from __future__ import annotations

import abc
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any, ClassVar

from portsentry.core.probe import IPAddress, Protocol

# A command that has not finished in this time is hung (a stuck xtables lock, say), not slow.
COMMAND_TIMEOUT = 30.0
AUTO_ORDER = ("nftables", "ipset", "route")


class BackendError(Exception):
    """A backend command failed; the message names the command and what it printed."""


@dataclass(frozen=True, slots=True)
class RunResult:
    """What one command did: its exit status and its output, decoded as text."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


Runner = Callable[[Sequence[str], "str | None"], RunResult]


def run_argv(argv: Sequence[str], stdin: str | None = None) -> RunResult:
    """Run `argv` without a shell, feeding `stdin`; a missing program is exit status 127 (as a
    shell would say), a command that outlives COMMAND_TIMEOUT raises BackendError."""
    try:
        proc = subprocess.run(
            list(argv),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
            # A group of its own: a terminal's Ctrl-C, sent to the whole foreground group, must
            # not kill a kernel change half way; the daemon stops at its own pace.
            process_group=0,
        )
    except FileNotFoundError:
        return RunResult(127, "", f"{argv[0]}: command not found")
    except subprocess.TimeoutExpired as exc:
        raise BackendError(f"{' '.join(argv)}: no answer after {COMMAND_TIMEOUT:g}s") from exc
    return RunResult(proc.returncode, proc.stdout, proc.stderr)


Caught = tuple[IPAddress, Protocol, int]  # a caught probe: source, protocol, destination port
Guarded = IPv4Network | IPv6Network | IPAddress  # a source the kernel must not ban on its own


def address_text(address: object) -> str:
    """The canonical text of an address, refusing anything but an ipaddress object so no string
    from the network can ever be spliced into a command."""
    if not isinstance(address, IPv4Address | IPv6Address):
        raise TypeError(f"ban address must be an IPv4Address or IPv6Address, not {address!r}")
    return address.compressed


def unpacked(packed: bytes) -> IPAddress:
    """The address of 4 or 16 packed bytes; anything else is refused (TypeError, like
    address_text), so no other bytes reach a kernel message or a command."""
    if type(packed) is not bytes or len(packed) not in (4, 16):
        raise TypeError(f"a packed ban address is 4 or 16 bytes, not {packed!r}")
    return IPv4Address(packed) if len(packed) == 4 else IPv6Address(packed)


def check_timeout(timeout: float | None) -> float | None:
    """A ban's lifetime in seconds (None = forever), refusing values no backend can express."""
    if timeout is None:
        return None
    if not timeout > 0 or timeout != timeout or timeout == float("inf"):
        raise ValueError(f"ban timeout must be a positive number of seconds or None, not {timeout!r}")
    return float(timeout)


def failed(argv: Sequence[str], result: RunResult, stdin: str | None = None) -> BackendError:
    """A BackendError naming the command, its exit status and its error output."""
    detail = (result.stderr or result.stdout).strip()
    shown = " ".join(argv)
    if stdin is not None:
        first = stdin.splitlines()[0] if stdin.strip() else ""
        shown += f" < ({len(stdin.splitlines())} lines: {first[:80]!r}...)"
    return BackendError(f"{shown} exited {result.returncode}: {detail or '(no output)'}")


class BanBackend(abc.ABC):
    """Blocks addresses natively in the kernel. Every method is idempotent, so the daemon can
    replay its ban store at start without first asking what the kernel already holds."""

    name: ClassVar[str]
    families: ClassVar[frozenset[int]] = frozenset({4, 6})
    # Constructor keywords pick_backend may pass on.
    OPTIONS: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, runner: Runner = run_argv) -> None:
        self.runner = runner

    def run(self, argv: Sequence[str], stdin: str | None = None) -> RunResult:
        """Run a command that must succeed."""
        result = self.runner(argv, stdin)
        if not result.ok:
            raise failed(argv, result, stdin)
        return result

    def probe(self, argv: Sequence[str]) -> bool:
        """Whether a harmless command runs cleanly (for is_supported)."""
        try:
            return self.runner(argv, None).ok
        except (BackendError, OSError):
            return False

    @abc.abstractmethod
    def is_supported(self) -> bool:
        """Whether the tools are present and a harmless command works here."""

    @abc.abstractmethod
    def setup(self) -> None:
        """Create what this backend needs; idempotent; touches nothing it did not create."""

    @abc.abstractmethod
    def add(self, address: IPAddress, timeout: float | None) -> None:
        """Block `address` for `timeout` seconds (None = until removed); re-adding refreshes it."""

    @abc.abstractmethod
    def remove(self, address: IPAddress) -> None:
        """Unblock `address`; an address that is not blocked is fine."""

    @abc.abstractmethod
    def members(self) -> dict[IPAddress, float | None]:
        """What the kernel blocks now, with the seconds left (None = no expiry)."""

    def add_many(self, bans: Iterable[tuple[IPAddress, float | None]]) -> None:
        """Block many addresses; backends with a batch interface override this."""
        for address, timeout in bans:
            self.add(address, timeout)

    # The first-probe ban in the kernel (responders.nft_capture): only nftables makes bans on
    # its own; for the others there is nothing to guard or settle.

    def claim_ban_slot(self, address: IPAddress) -> bool:
        """Before a ban the daemon makes on its own (a scan's, counted against BAN_RATE_LIMIT):
        whether the kernel's cap on new bans lets it in. Only a backend whose kernel bans on its
        own under that cap (nftables' first-probe ban) has one; then the ban takes one of the
        cap's slots, unless `address` is banned in the kernel already (the first-probe ban
        made it, and took its slot). False when every slot of the last minute is taken."""
        return True

    def first_probe_bans(self) -> bool:
        """Whether the kernel bans qualifying probes itself (and keeps caught entries)."""
        return False

    def set_guards(self, protect: Iterable[Guarded], nokernel: Iterable[Guarded]) -> None:
        """The sources the kernel must never ban on its own (see NftablesBackend)."""
        return  # no first-probe bans here: nothing to guard

    def keeps_caught(self) -> bool:
        """Whether caught entries may be waiting to be settled: the first-probe ban is on, or
        was, and its entries have not all been read settled since."""
        return self.first_probe_bans()

    def caught(self) -> list[Caught]:
        """Kernel-made bans the daemon has not settled yet: (source, protocol, port)."""
        return []

    def dropped(self) -> dict[IPAddress, int]:
        """Per banned source, the probes the kernel dropped before the capture saw them."""
        return {}  # nothing is counted here: the packet capture sees every probe

    def release_caught(self, entries: Iterable[Caught]) -> None:
        """Forget settled caught entries."""
        return  # nothing is ever caught here

    def forget_caught(self, addresses: Iterable[IPAddress]) -> None:
        """Forget the caught entries of sources that were unblocked: unsettled, they would have
        the daemon record the ban late and put it back."""
        wanted = set(addresses)
        if wanted and (found := [entry for entry in self.caught() if entry[0] in wanted]):
            self.release_caught(found)

    def repair_capture(self) -> bool:
        """Rebuild what someone removed behind our back (`nft flush ruleset`); True when it had
        to, and the bans must then be added again. The default has nothing to look at."""
        return False

    def restore_lost(self, active: Callable[[], Iterable[bytes]]) -> int:
        """Once a minute, for a backend whose bans can vanish one by one without a trace of it
        in a table or rule that repair_capture could watch: put back those of `active` (the
        stored bans, packed; called only when needed) that are gone; how many. Here: none."""
        return 0

    def restore_many(self, bans: Iterable[tuple[bytes, float | None]]) -> None:
        """Put recorded bans back at start, given as packed addresses (4 or 16 bytes: a million
        of them are read without an address object each) with their seconds left. Every address
        ends up blocked; one the kernel still holds may keep the timeout it already has (the one
        recorded with it). Backends with a cheaper form than add_many override this."""
        self.add_many((unpacked(packed), timeout) for packed, timeout in bans)

    def holds_any(self) -> bool:
        """Whether the kernel may hold a ban of ours (True when that cannot be known cheaply):
        empty sets (after a reboot) need no replace_all, only the stored bans added."""
        return True

    def replace_all(self, bans: Iterable[tuple[bytes, float | None]]) -> None:
        """At start: the kernel holds exactly the stored bans `bans` (as restore_many takes them),
        each with the time given, and none that the store does not know (a backend with a
        first-probe ban keeps those still waiting to be recorded). Backends that cannot empty
        their state in one step only add (restore_many)."""
        self.restore_many(bans)

    def remove_many(self, addresses: Iterable[IPAddress]) -> None:
        """Lift many bans (`portsentry unblock --file`); backends with a batch form override it."""
        for address in addresses:
            self.remove(address)

    @abc.abstractmethod
    def teardown(self) -> str | None:
        """Remove everything this backend created (`portsentry flush`); idempotent. Returns what
        it found and removed, for an admin ("table inet portsentry"), or None when nothing of
        ours was there: a second flush must not say it removed something."""

    @abc.abstractmethod
    def owned(self) -> str:
        """What teardown would remove, named for an admin ("nftables table inet portsentry")."""

    def describe(self) -> str:
        return self.name


def _registry() -> dict[str, type[BanBackend]]:
    # Imported here because the backend modules import this one.
    from portsentry.responders.iproute import RouteBackend
    from portsentry.responders.ipset import IpsetBackend
    from portsentry.responders.nftables import NftablesBackend

    return {"nftables": NftablesBackend, "ipset": IpsetBackend, "route": RouteBackend}


def pick_backend(
    preferred: str | None, runner: Runner = run_argv, **options: Any
) -> BanBackend | None:
    """The backend named `preferred` if it works here, else (with None or "auto") the first of
    nftables, ipset, route that does; None when nothing works. `options` go to the constructor
    of whichever backend accepts them; a keyword no backend knows is a ValueError."""
    registry = _registry()
    if preferred in (None, "auto"):
        order: Sequence[str] = AUTO_ORDER
    elif preferred in registry:
        order = (preferred,)
    else:
        raise ValueError(
            f"unknown ban backend {preferred!r} (choose one of: auto, {', '.join(AUTO_ORDER)})"
        )
    known: set[str] = set().union(*(cls.OPTIONS for cls in registry.values()))
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown ban backend option(s): {', '.join(unknown)}")
    for name in order:
        cls = registry[name]
        accepted = cls.OPTIONS
        # In auto mode each candidate takes the options meant for it and ignores the rest.
        backend = cls(runner=runner, **{k: v for k, v in options.items() if k in accepted})
        if backend.is_supported():
            return backend
    return None
