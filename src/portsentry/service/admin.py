"""Admin commands that work on the ban store and the backends: block, unblock, list, flush,
hosts-deny tidy, check. They work whether or not the daemon runs: the store is the shared truth,
and a running daemon picks up changes within a second."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass

from portsentry.bans.lifecycle import BanManager, BanPolicy, time_said
from portsentry.bans.records import MANUAL_REASON, TimeChange
from portsentry.bans.store import ORIGIN_LOCAL, ORIGIN_LOCAL_ONLY, BanStore, StoreError
from portsentry.config.ignore import IgnoreFileError, open_ignore
from portsentry.config.settings import Config, ConfigError, engine_settings
from portsentry.core.actions import Block
from portsentry.core.addresses import impossible_source
from portsentry.core.probe import IPAddress, Mode, Probe
from portsentry.host import info as hostinfo
from portsentry.responders.backend import AUTO_ORDER, BackendError, BanBackend, pick_backend
from portsentry.responders.classic import ClassicResponder, StepFailure
from portsentry.responders.hostsdeny import HostsDeny
from portsentry.service.adminio import AdminError as AdminError
from portsentry.service.adminio import as_json as as_json
from portsentry.service.adminio import format_listing as format_listing
from portsentry.service.adminio import not_done as not_done
from portsentry.service.adminio import parse_address as parse_address
from portsentry.service.adminio import parse_duration as parse_duration
from portsentry.service.adminio import partly_done
from portsentry.service.control import Request, Response


def store_path(config: Config) -> str:
    return os.path.join(config.state_dir, "bans.sqlite3")


def hosts_deny_lock_path(config: Config) -> str:
    """Beside the control socket (/run/portsentry), not in /etc: the hardened unit may write
    hosts.deny itself and nothing else there. Daemon, CLI and tidy share it."""
    return os.path.join(os.path.dirname(config.control_socket), "hosts.deny.lock")


def open_hosts_deny(config: Config) -> HostsDeny:
    return HostsDeny(config.hosts_deny_file, lock_path=hosts_deny_lock_path(config))


def open_backend(config: Config, setup: bool = True) -> BanBackend | None:
    """The configured native backend, set up; None for BAN_BACKEND="none" or when "auto" finds none."""
    if config.ban_backend == "none":
        return None
    backend = pick_backend(config.ban_backend, table=config.nft_table, hook=config.nft_hook,
                           priority=config.nft_priority, set_size=config.ban_set_size)
    if backend is None:
        if config.ban_backend == "auto":
            return None
        raise config.error("BAN_BACKEND", f"{config.ban_backend} does not work on this host")
    if setup:
        try:
            backend.setup()
        except (BackendError, OSError) as error:
            raise config.error("BAN_BACKEND", f"cannot set up {backend.describe()}: {error}") from error
    return backend


def auto_fallback(config: Config, backend: BanBackend | None) -> str | None:
    """What BAN_BACKEND="auto" settled for when it is not nftables, its first choice; None
    otherwise. The start says it: the routes drop only the replies, and none bans nothing."""
    if config.ban_backend != "auto" or (backend is not None and backend.name == AUTO_ORDER[0]):
        return None
    if backend is None:
        return (f'BAN_BACKEND="auto": none of {", ".join(AUTO_ORDER)} works here; no native bans: '
                "scanners are blocked only by KILL_ROUTE and KILL_HOSTS_DENY, where set")
    skipped = AUTO_ORDER[:AUTO_ORDER.index(backend.name)] if backend.name in AUTO_ORDER else AUTO_ORDER
    verb = "does" if len(skipped) == 1 else "do"
    return f'BAN_BACKEND="auto": {" and ".join(skipped)} {verb} not work here; bans are {backend.describe()}'


def protected_addresses(config: Config) -> frozenset[IPAddress]:
    """Default gateways and DNS resolvers, re-read every tick: DHCP and VPNs change them."""
    found: set[IPAddress] = set()
    try:
        if config.protect_gateways:
            found |= hostinfo.default_gateways()
        if config.protect_resolvers:
            found |= hostinfo.dns_resolvers(config.resolv_conf)
    except OSError:
        pass
    return frozenset(found)


# The fleet gate's refusal reasons (fleet.gate.Guards.refusal), as a manual block says them.
_SPARED_WORDS = {
    "impossible": "an address that cannot be the source of a real packet",
    "own_address": "one of this host's addresses",
    "ignored": "on the ignore list (IGNORE_FILE)",
    "protected": "a default gateway or DNS resolver of this host (PROTECT_GATEWAYS, PROTECT_RESOLVERS)",
}


class Spared:
    """What a ban by hand must spare, as a scan's ban and a fleet peer's do: this host's own
    addresses, the ignore list and (PROTECT_GATEWAYS, PROTECT_RESOLVERS) the default gateways
    and DNS resolvers. A typo in `block` must not cut the host off from its router. The checks
    are the fleet gate's (fleet.gate.Guards); only the words are the admin's."""

    def __init__(self, own: Iterable[IPAddress] = (), ignore: Container[IPAddress] = frozenset(),
                 protected: Iterable[IPAddress] = ()) -> None:
        # Here, not at the top: `portsentry list` and `status` need none of the fleet's modules.
        from portsentry.fleet.gate import Guards

        self.guards = Guards(frozenset(own), ignore, frozenset(protected))

    def reason(self, address: IPAddress) -> str | None:
        """Why `address` must not be blocked by hand, or None."""
        refused = self.guards.refusal(address)
        return None if refused is None else _SPARED_WORDS[refused]

    @classmethod
    def of_host(cls, config: Config) -> Spared:
        """As the daemon would have them now, for a ban made without it."""
        own = hostinfo.local_addresses()
        try:
            ignore = open_ignore(config, lambda: own).current(time.time())
        except (ConfigError, IgnoreFileError) as error:
            raise AdminError(f"{error}; so which addresses must never be blocked is unknown") from None
        return cls(own, ignore, protected_addresses(config))


@dataclass(frozen=True)
class Outcome:
    """What a block or unblock by hand did: `done` when recorded (the ban in force, or lifted),
    the steps that failed (said in the log; the admin sees the same lines), and for a block of
    an address banned already, what became of its end."""

    done: bool
    failed: tuple[StepFailure, ...] = ()
    change: TimeChange | None = None

    @property
    def lines(self) -> list[str]:
        return [line for failure in self.failed for line in failure.lines]

    def error(self, command: str, address: IPAddress) -> str | None:
        """Why the command exits 1, or None: not done at all, or done with steps that failed."""
        if not self.done:
            return not_done(command, address)
        if self.failed:
            return partly_done(command, address, (failure.kind for failure in self.failed))
        return None


@dataclass
class Admin:
    config: Config
    store: BanStore
    bans: BanManager
    log: list[str]

    @classmethod
    def open(cls, config: Config, setup: bool = True) -> Admin:
        """`setup`: make the backend's table or sets where missing, which `block` and `unblock`
        need; `list` reads the store only, and must not put back a table `flush` removed."""
        lines: list[str] = []
        # The daemon, running or not, reports what this writes: this process has no event log.
        store = BanStore(store_path(config), reports=False)
        bans = BanManager(store, open_backend(config, setup), open_hosts_deny(config),
                          BanPolicy.from_config(config), lines.append)
        return cls(config, store, bans, lines)

    def block(self, address: IPAddress, duration: float | None, now: float) -> Outcome:
        responder = ClassicResponder(self.bans.hosts_deny, self.log.append, self.config.command_timeout,
                                     clock=lambda: now)
        return manual_block(self.bans, responder, self.config, address, duration, now,
                            Spared.of_host(self.config))

    def unblock(self, address: IPAddress, now: float, local: bool = False) -> Outcome:
        return unblock(self.bans, self.config, address, now, self.log.append, local)

    def listing(self, now: float) -> list[dict[str, object]]:
        return ban_rows(self.store, now)

    def close(self) -> None:
        self.store.close()


def manual_block(bans: BanManager, responder: ClassicResponder, config: Config, address: IPAddress,
                 duration: float | None, now: float | None = None, spared: Spared | None = None) -> Outcome:
    """Block by hand with the same steps a scan would trigger (BLOCK_TCP=1); an address banned
    already only has its end moved (BanManager.block_by_hand)."""
    if (bad := impossible_source(address)) is not None:
        raise AdminError(f"{address} is a {bad} address: it cannot be the source of a real packet, "
                         "so there is nothing to block")
    if spared is not None and (why := spared.reason(address)) is not None:
        raise AdminError(f"{address} is {why}: not blocked")
    if (idle := nothing_blocks(config, bans)) is not None:
        raise AdminError(f"{address} not blocked: {idle}")
    probe = Probe(source=address, port=0, mode=Mode.TCP, kind=MANUAL_REASON)
    failed: list[StepFailure] = []
    # Not counted against BAN_RATE_LIMIT: never refused by it.
    done = bans.block_by_hand(Block(probe, engine_settings(config).steps(1)), responder, duration,
                              time.time() if now is None else now, failed)
    if isinstance(done, TimeChange):
        return Outcome(True, tuple(failed), done)
    return Outcome(done, tuple(failed))


def nothing_blocks(config: Config, bans: BanManager) -> str | None:
    """Why a ban by hand would do nothing at all, or None: with no native backend and no KILL_
    command it said "done", blocked nothing, and recorded nothing (or, by --file, bans that
    nothing held)."""
    if bans.backend is not None or config.kill_route or config.kill_hosts_deny or config.kill_run_cmd:
        return None
    backend = ("BAN_BACKEND is none" if config.ban_backend == "none"
               else f'BAN_BACKEND="{config.ban_backend}" found no backend here')
    return f"nothing here blocks ({backend} and none of KILL_ROUTE, KILL_HOSTS_DENY, KILL_RUN_CMD is set)"


def ban_rows(store: BanStore, now: float) -> list[dict[str, object]]:
    return [
        {
            "address": str(ban.address),
            "expires": ban.expires,
            "remaining": None if ban.expires is None else max(0, round(ban.expires - now)),
            "reason": ban.reason,
            "mode": ban.mode,
            "port": ban.port,
            "count": ban.count,
            "offences": ban.offences,
            "first_seen": ban.first_seen,
            "last_seen": ban.last_seen,
            "backends": list(ban.backends),
            "hosts_deny_line": ban.hosts_deny_line,
            "origin": ban.origin,
        }
        for ban in store.active(now)
    ]


def admin_request(
    bans: BanManager, responder: ClassicResponder, config: Config, request: Request, now: float,
    spared: Callable[[], Spared] = Spared,
) -> Response:
    """list / block / unblock as the control socket receives them; `spared` says, when a block
    asks, what the daemon spares now."""
    if request.command == "list":
        return Response.success(bans=ban_rows(bans.store, now))
    address = parse_address(request.address or "")
    lines: list[str] = []
    if request.command == "block":
        duration = bans.duration(address, now) if request.duration == "policy" else request.duration
        outcome = manual_block(bans, responder, config, address, duration, now, spared())
    elif request.command == "unblock":
        outcome = unblock(bans, config, address, now, lines.append, request.local)
    else:
        return Response.failure(f"unknown command {request.command!r}")
    # The lines of what failed and of a ban's end moved, as the log has them: the admin asking
    # reads the reply, not the log.
    said = [*outcome.lines, *lines]
    if outcome.change is not None:
        said.insert(0, time_said(outcome.change))
    error = outcome.error(request.command, address)
    return Response.success(lines=said) if error is None else Response.failure(error, lines=said)


def unblock(bans: BanManager, config: Config, address: IPAddress, now: float,
            log: Callable[[str], None], local: bool = False) -> Outcome:
    # Only what the store says we did is undone: a hosts.deny line we did not append is the
    # admin's (or fail2ban's), even when it reads exactly like ours. A fleet hears of the lift
    # (its publisher sends lifts of origin "local") unless `local`.
    try:
        held = bans.store.get(address)
    except StoreError:
        held = None  # the lift says what is wrong with the store
    failed: list[StepFailure] = []
    reason, origin = (("unblocked by admin on this host only", ORIGIN_LOCAL_ONLY) if local
                      else ("unblocked by admin", ORIGIN_LOCAL))
    lifted = bans.lift(address, now, reason, origin=origin, failed=failed)
    # Debian's file sets KILL_ROUTE and 1.2 has no undo: without this the admin reads "done"
    # while the reject route (or firewall rule) still cuts the host off. Only where KILL_ROUTE
    # ran for the ban: a fleet peer's ban or a kernel ban left no route behind.
    if lifted and config.kill_route and not config.kill_route_undo and (held is None or held.routed):
        log(f"note: KILL_ROUTE_UNDO is not set, so what KILL_ROUTE did for {address} "
            f"({config.kill_route!r}) is still in place; undo it by hand")
    return Outcome(lifted, tuple(failed))
