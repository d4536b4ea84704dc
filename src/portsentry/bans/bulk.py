"""`portsentry block --file` and `unblock --file`: many bans made or lifted at once.

A list of 100,000 addresses (a threat feed, a migration from another tool) must not take 100,000
transactions, 100,000 kernel round trips and 100,000 rewrites of hosts.deny. Here the store takes
them in one transaction (recorded before applied, as for a single ban), the kernel set in one
batch, hosts.deny in one read and one write, and only the per-address shell commands (KILL_ROUTE,
KILL_RUN_CMD, KILL_ROUTE_UNDO) run one by one, a few at a time. A running daemon learns of the
change from the ban store.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TextIO

from portsentry.bans.lifecycle import BanManager
from portsentry.bans.records import MANUAL_REASON
from portsentry.bans.store import ORIGIN_LOCAL_ONLY, ROUTE_MARK, BanRequest, StoreError, normalise
from portsentry.config.settings import Config
from portsentry.core import messages
from portsentry.core.addresses import impossible_source
from portsentry.core.probe import IPAddress, Mode
from portsentry.responders.backend import BackendError
from portsentry.responders.hostsdeny import HostsDeny, HostsDenyError
from portsentry.responders.shell import CommandResult
from portsentry.responders.substitute import hosts_deny_entry, substitute

COMMAND_CONCURRENCY = 4
MAX_LINE = 4096  # characters of a feed line: an address and its comment fit many times over
SHOWN = 60  # characters of a bad line quoted in its error
SHOWN_ERRORS = 20
_COMMENT = re.compile(r"#.*")

Duration = float | None | str  # seconds, None = forever, POLICY = BLOCK_TIME and escalation


class AddressListError(ValueError):
    """`FILE:LINE: 'text' is not an IP address`, for each bad line (all of them, not the first)."""


def feed_lines(handle: TextIO) -> Iterator[str]:
    """The lines of `handle`, each cut after MAX_LINE + 1 characters and the rest skipped: a
    100 MB line (a binary file given by mistake) is never held whole."""
    while chunk := handle.readline(MAX_LINE + 1):
        if len(chunk) > MAX_LINE and not chunk.endswith("\n"):
            while (rest := handle.readline(MAX_LINE)) and not rest.endswith("\n"):
                pass
        yield chunk


def _shown(text: str) -> str:
    """`text` quoted in at most SHOWN characters and its quotes (then "..."): counted after
    quoting, where a control character takes four ('\\x00')."""
    quoted = repr(text)
    if len(quoted) <= SHOWN + 2:
        return quoted
    cut = text[:SHOWN]
    while len(quoted := repr(cut)) > SHOWN + 2:
        cut = cut[:-1]
    return f"{quoted}..."


def read_addresses(lines: Iterable[str], source: str) -> list[IPAddress]:
    """One address per line; blank lines and `#` comments are fine, anything else is an error
    naming the file and line (the first SHOWN_ERRORS of them). Duplicates are dropped, the order
    kept."""
    found: dict[IPAddress, None] = {}
    errors: list[str] = []
    bad = 0
    for number, line in enumerate(lines, 1):
        if len(line.rstrip("\r\n")) > MAX_LINE and "#" not in line:
            error = f"{source}:{number}: longer than {MAX_LINE} characters: {_shown(line)}"
        else:
            text = _COMMENT.sub("", line).strip()
            if not text:
                continue
            try:
                found[normalise(text)] = None
                continue
            except ValueError:
                error = f"{source}:{number}: {_shown(text)} is not an IP address"
        bad += 1
        if len(errors) < SHOWN_ERRORS:  # counted, not kept: a wrong file may have a million
            errors.append(error)
    if errors:
        more = bad - len(errors)
        raise AddressListError("\n".join(errors + ([f"... and {more} more"] if more else [])))
    return list(found)


@dataclass
class BulkResult:
    done: int = 0  # banned (or lifted)
    skipped: list[str] = field(default_factory=list)  # why some addresses were not acted on
    failed_commands: int = 0
    failed_steps: int = 0  # batch steps (kernel set, hosts.deny) that failed, each said in the log


@dataclass(frozen=True)
class ManualSteps:
    """What a manual ban does besides the store and the kernel set (from the configuration)."""

    hosts_deny: str | None = None  # KILL_HOSTS_DENY
    route: str | None = None  # KILL_ROUTE
    run_cmd: str | None = None  # KILL_RUN_CMD
    undo: str | None = None  # KILL_ROUTE_UNDO

    @classmethod
    def from_config(cls, config: Config) -> ManualSteps:
        """As BLOCK_TCP="1" would act (what `portsentry block ADDR` does for one address)."""
        return cls(config.kill_hosts_deny, config.kill_route, config.kill_run_cmd, config.kill_route_undo)


def block_many(bans: BanManager, steps: ManualSteps, addresses: Sequence[IPAddress], now: float,
               duration: Duration, run: Callable[[str, float], CommandResult],
               spared: Callable[[IPAddress], str | None] = lambda _address: None) -> BulkResult:
    """`spared` says why an address must not be blocked (own, ignore list, gateway), or None."""
    result = BulkResult()
    wanted: list[IPAddress] = []
    for address in addresses:
        if (bad := impossible_source(address)) is not None:
            result.skipped.append(f"{address}: a {bad} address cannot be the source of a real packet")
        elif (why := spared(address)) is not None:
            result.skipped.append(f"{address}: {why}: not blocked")
        else:
            wanted.append(normalise(address))
    if bans.backend is None and not steps.hosts_deny and not steps.route:
        # KILL_RUN_CMD alone holds nothing, as for a single block (BanManager.enforce): it only
        # runs. Recorded, every address was listed, reported and shared as a ban nothing held.
        failed = _run_each(bans, [steps.run_cmd] if steps.run_cmd else [], wanted, run)
        result.failed_commands = len(failed)
        result.done = len(wanted) - len(failed)
        return result
    backends = ((bans.backend.name,) if bans.backend is not None else ()) + (
        (ROUTE_MARK,) if steps.route else ())
    requests = [
        BanRequest(address, MANUAL_REASON, str(Mode.TCP), 0, duration,
                   hosts_deny_entry(steps.hosts_deny, address, 0, Mode.TCP) if steps.hosts_deny else None,
                   backends)
        for address in wanted]
    # As enforce: a ban this extends keeps only the mark an earlier KILL_ROUTE earned (read before
    # ban_many adds the mark to every ban it makes or extends).
    routed_before = {ban.address for ban in bans.store.get_many(wanted)
                     if ban.active(now) and ban.routed} if steps.route else set()
    # Recorded before applied: a crash half-way leaves records that restore completes.
    made = bans.store.ban_many(requests, now, policy=bans.duration_after)
    if bans.backend is not None and made:
        try:
            bans.backend.add_many((ban.address, None if ban.expires is None else ban.expires - now)
                                  for ban in made)
        except (BackendError, OSError) as error:
            result.failed_steps += 1
            bans.log(messages.native_block_failed(f"({len(made)} addresses)", bans.backend.describe(),
                                                  str(error)))
    lines = {ban.hosts_deny_line: ban.address for ban in made if ban.hosts_deny_line}
    if lines and not _add_lines(bans, bans.hosts_deny, lines, now):
        result.failed_steps += 1
    commands = [template for template in (steps.route, steps.run_cmd) if template]
    failed = _run_each(bans, commands, [ban.address for ban in made], run)
    result.failed_commands = len(failed)
    # As for a single block: a ban whose KILL_ROUTE failed is not held by a route, unless an
    # earlier one's route holds it ("File exists").
    unrouted = [address for address, template in failed
                if template == steps.route and address not in routed_before]
    if unrouted:
        try:
            bans.store.unmark_routed(unrouted)
        except StoreError as error:
            bans.log(messages.store_failed(str(error)))
    result.done = len(made)
    return result


def unblock_many(bans: BanManager, steps: ManualSteps, addresses: Sequence[IPAddress], now: float,
                 run: Callable[[str, float], CommandResult], local: bool = False) -> BulkResult:
    """Lift every ban of `addresses` in one go; with `local`, on this host only (the fleet
    publisher sends lifts of origin "local", not "local-only")."""
    result = BulkResult()
    held = bans.store.get_many(addresses)
    if bans.backend is not None and held:
        try:
            bans.backend.remove_many(ban.address for ban in held)
        except (BackendError, OSError) as error:
            bans.kernel_unsure = True
            result.failed_steps += 1
            bans.log(messages.native_unblock_failed(f"({len(held)} addresses)", str(error)))
    ours = bans.store.owned_of(ban.address for ban in held)
    if ours:
        try:
            bans.hosts_deny.remove_many([line for _address, line in ours])
        except (HostsDenyError, OSError, ValueError) as error:
            # As a single unblock: the lines stay ours, so `hosts-deny tidy` can take them out later.
            result.failed_steps += 1
            bans.log(messages.config_error(f"cannot remove {len(ours)} lines from "
                                           f"{bans.hosts_deny.path}: {error}"))
        else:
            bans.store.disown_lines(ours)
    # Only what KILL_ROUTE did here is undone (ROUTE_MARK): a peer's ban never ran it.
    result.failed_commands = len(_run_each(bans, [steps.undo] if steps.undo else [],
                                           [ban.address for ban in held if ban.routed], run))
    if local:
        result.done = bans.store.lift_many((ban.address for ban in held), now,
                                           "unblocked by admin on this host only", origin=ORIGIN_LOCAL_ONLY)
    else:
        result.done = bans.store.lift_many((ban.address for ban in held), now, "unblocked by admin")
    result.skipped = [f"{a}: not blocked" for a in sorted(set(addresses) - {b.address for b in held},
                                                          key=str)]
    return result


def _add_lines(bans: BanManager, hosts_deny: HostsDeny, lines: dict[str, IPAddress], now: float) -> bool:
    def own(appended: list[str]) -> None:
        bans.store.own_lines(((lines[line], line) for line in appended), now)

    try:
        hosts_deny.add_many(list(lines), on_append=own)
    except (HostsDenyError, OSError, ValueError) as error:
        bans.log(messages.config_error(f"cannot add {len(lines)} lines to {hosts_deny.path}: {error}"))
        return False
    return True


def _run_each(bans: BanManager, templates: Sequence[str], addresses: Sequence[IPAddress],
              run: Callable[[str, float], CommandResult]) -> list[tuple[IPAddress, str]]:
    """Each command for each address, COMMAND_CONCURRENCY at a time; the (address, template)
    of each that failed."""
    if not templates or not addresses:
        return []
    timeout = bans.policy.command_timeout

    def one(address: IPAddress) -> list[tuple[IPAddress, str]]:
        failed = []
        for template in templates:
            command = substitute(template, address, 0, Mode.TCP)
            outcome = run(command, timeout)
            if not outcome.ok:
                failed.append((address, template))
                bans.log(messages.command_failed(str(address), outcome.failure()))
        return failed

    with ThreadPoolExecutor(max_workers=COMMAND_CONCURRENCY, thread_name_prefix="bulk") as pool:
        return [failure for failures in pool.map(one, addresses) for failure in failures]
