"""The `portsentry` command: 1.2's mode flags, the modern `run` spelling, and admin subcommands."""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import os
import stat
import sys
import time
from collections.abc import Sequence

from portsentry import __version__
from portsentry.config.ignore import IgnoreFileError, IgnoreSource
from portsentry.config.settings import Config, ConfigError, LoadedConfig, format_effective, load_effective
from portsentry.core import messages
from portsentry.core.probe import Mode
from portsentry.host import privileges
from portsentry.host.info import local_addresses
from portsentry.journal.failures import WriteFailures
from portsentry.journal.journal import Journal
from portsentry.journal.journald import JournaldWriter, journald_available
from portsentry.journal.syslog import DEFAULT_SOCKET, SyslogWriter
from portsentry.journal.telemetry import Telemetry
from portsentry.service import control
from portsentry.service.resolver import Resolver
from portsentry.service.status import NOT_RUNNING, show_status

CLASSIC_FLAGS = {f"-{mode}": mode for mode in Mode}
# PortSentry 2.x spellings: --connect watched real sockets, --stealth captured packets.
ALIASES = {"--connect": (Mode.TCP, Mode.UDP), "--stealth": (Mode.STCP, Mode.SUDP)}
SUBCOMMANDS = ("run", "check-config")

# The synopsis without "usage: ": argparse adds that itself (it printed "usage: usage:").
SYNOPSIS = """\
portsentry [-tcp] [-udp] [-stcp] [-atcp] [-sudp] [-audp] [options]
       portsentry run --mode MODE [--mode MODE ...] [options]
       portsentry check-config [-c FILE]
       portsentry status | list | block ADDR | unblock ADDR | reload | flush   [-c FILE]
       portsentry hosts-deny tidy [--dry-run] | check | demo
       portsentry --version"""

DESCRIPTION = """\
Port scan detector. Each mode flag watches one kind of traffic (several may be given):
  -tcp / -udp     bind the TCP_PORTS / UDP_PORTS and report every connection or datagram
  -stcp / -sudp   watch the same ports for stealth scans without binding them
  -atcp / -audp   watch every port below ADVANCED_PORTS_TCP/UDP that has no service
  --connect = -tcp -udp, --stealth = -stcp -sudp (PortSentry 2.x spellings)
"""

USAGE = f"usage: {SYNOPSIS}\n\n{DESCRIPTION}"


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", metavar="FILE",
                        help="configuration file (default /etc/portsentry/portsentry.conf if present, "
                        "else the built-in default)")
    parser.add_argument("--log-stderr", action="store_true",
                        help="also print every log line to standard error")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also log ignored hosts and hits below SCAN_TRIGGER")
    parser.add_argument("--syslog-socket", metavar="PATH", default=DEFAULT_SOCKET,
                        help=f"syslog socket to write to (default {DEFAULT_SOCKET})")
    parser.add_argument("--no-syslog", action="store_true", help="do not write to syslog")
    parser.add_argument("--daemon", action="store_true",
                        help="fork into the background like 1.2 (default: stay in the foreground)")
    parser.add_argument("--pid-file", metavar="PATH", help="write the daemon's pid here")
    parser.add_argument("--journald", action="store_true",
                        help="log to the systemd journal with structured fields instead of syslog "
                        "(automatic when systemd runs portsentry)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="portsentry", usage=SYNOPSIS, description=DESCRIPTION,
                                     add_help=True, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"portsentry {__version__}")
    _options(parser)
    parser.add_argument("--mode", action="append", default=[], choices=[m.value for m in Mode],
                        help="a mode to run (repeatable); same as the -tcp style flags")
    parser.add_argument("command", nargs="?", choices=SUBCOMMANDS, help=argparse.SUPPRESS)
    return parser


class UsageError(Exception):
    pass


def split_modes(argv: Sequence[str]) -> tuple[list[Mode], list[str]]:
    """Takes 1.2's single-dash mode flags out before argparse, which would read -tcp as -t -c p."""
    modes: list[Mode] = []
    rest: list[str] = []
    for arg in argv:
        looks_like_mode = arg.startswith("-") and not arg.startswith("--") and len(arg) > 2
        if looks_like_mode and arg[1] not in "cvh" and arg not in CLASSIC_FLAGS:
            raise UsageError(f"unknown mode {arg} (modes: {' '.join(CLASSIC_FLAGS)})")
        if arg in CLASSIC_FLAGS:
            modes.append(CLASSIC_FLAGS[arg])
        elif arg in ALIASES:
            modes.extend(ALIASES[arg])
        else:
            rest.append(arg)
    return modes, rest


ADMIN_COMMANDS = ("block", "unblock", "list", "flush", "hosts-deny", "check", "status", "reload")


def build_admin_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="portsentry", description="Manage bans without the daemon's help.")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("-c", "--config", metavar="FILE", help="configuration file")
        return p

    block = command("block", "block an address now, in every configured backend")
    block.add_argument("address", nargs="?")
    block.add_argument("--for", dest="duration", metavar="DURATION",
                       help="how long: 90, 15m, 2h, 7d or forever (default: BLOCK_TIME)")
    unblock = command("unblock", "unblock an address everywhere (backend, hosts.deny, KILL_ROUTE_UNDO)")
    unblock.add_argument("address", nargs="?")
    for bulk in (block, unblock):
        bulk.add_argument("--file", metavar="FILE",
                          help="one address per line (# comments fine), - for standard input: all in "
                               "one go, one store transaction and one kernel batch")
    listing = command("list", "list active bans")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    command("flush", "remove the native backend's table/sets (bans in the store stay)")
    tidy = command("hosts-deny", "hosts.deny upkeep")
    tidy.add_argument("action", choices=["tidy"])
    tidy.add_argument("--dry-run", action="store_true", help="show what would change, change nothing")
    command("check", "check the configuration and whether hosts.deny entries can have any effect")
    status = command("status", "is the daemon running, what it watches and blocked (exit 3: not running)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    command("reload", "re-read the configuration and ignore file (same as SIGHUP)")
    return parser


def admin_main(argv: Sequence[str]) -> int:
    from portsentry.bans.store import BanStore, StoreError
    from portsentry.bans.tidy import format_report, tidy_hosts_deny
    from portsentry.host.wrappers_check import check_wrappers
    from portsentry.service import admin

    args = build_admin_parser().parse_args(argv)
    try:
        loaded = load_effective(args.config)
        config = loaded.config
        now = time.time()
        if args.command == "check":
            status = check_config(loaded, [])
            warnings = check_wrappers()
            for warning in warnings:
                print(f"warning: {warning}")
            return status
        if args.command == "flush":
            backend = admin.open_backend(config, setup=False)
            if backend is None:
                print("no native ban backend configured (BAN_BACKEND)")
                return 0
            backend.teardown()
            print(f"removed {backend.describe()}")
            return 0
        if args.command == "hosts-deny":
            store = BanStore(admin.store_path(config))
            try:
                report = tidy_hosts_deny(config.hosts_deny_file, store, now, args.dry_run,
                                         lock_path=admin.hosts_deny_lock_path(config))
            finally:
                store.close()
            print(format_report(report, path=config.hosts_deny_file, dry_run=args.dry_run))
            return 0
        if args.command == "status":
            return show_status(config, args.json, now)
        if args.command == "reload":
            try:
                answer = control.request(config.control_socket, {"command": "reload"})
            except control.NotRunning:
                print("portsentry is not running", file=sys.stderr)
                return NOT_RUNNING
            print("reloaded" if answer.get("ok") else f"portsentry: {answer.get('error')}")
            return 0 if answer.get("ok") else 1
        if args.command in ("block", "unblock"):
            if (args.address is None) == (args.file is None):
                print(f"portsentry: {args.command}: give an ADDRESS or --file FILE", file=sys.stderr)
                return 2
            if args.file is not None:
                return bulk_main(config, args, now)
        via_daemon = through_daemon(config, args)
        if via_daemon is not None:
            return via_daemon
        print("(the daemon is not running: working on the ban store directly)", file=sys.stderr)
        tool = admin.Admin.open(config)
        try:
            if args.command == "list":
                rows = tool.listing(now)
                print(admin.as_json(rows) if args.json else admin.format_listing(rows))
                return 0
            address = admin.parse_address(args.address)
            if args.command == "block":
                duration = admin.parse_duration(args.duration) if args.duration else None
                if args.duration is None:
                    duration = tool.bans.duration(address, now)
                done = tool.block(address, duration, now)
            else:
                done = tool.unblock(address, now)
            for line in tool.log:
                print(line)
            if not done:
                print(f"portsentry: {args.command}: nothing to do for {address}"
                      if args.command == "unblock" else f"portsentry: could not block {address}",
                      file=sys.stderr)
            return 0 if done else 1
        finally:
            tool.close()
    except (ConfigError, admin.AdminError, StoreError, OSError) as error:
        print(f"portsentry: {error}", file=sys.stderr)
        return 1


def bulk_main(config: Config, args: argparse.Namespace, now: float) -> int:
    """block/unblock --file: straight on the ban store and the kernel, running daemon or not
    (it follows the store's change feed, so it hears of every ban within a second)."""
    from portsentry.bans import bulk
    from portsentry.responders.shell import run_shell
    from portsentry.service import admin

    source = "<stdin>" if args.file == "-" else args.file
    try:
        if args.file == "-":
            addresses = bulk.read_addresses(sys.stdin, source)
        else:
            with open(args.file, encoding="utf-8", errors="replace") as handle:
                addresses = bulk.read_addresses(handle, source)
    except bulk.AddressListError as error:
        print(f"portsentry: {error}", file=sys.stderr)
        return 1
    duration: bulk.Duration = "policy"
    if args.command == "block" and args.duration:
        duration = admin.parse_duration(args.duration)
    tool = admin.Admin.open(config)
    try:
        steps = bulk.ManualSteps.from_config(config)
        started = time.monotonic()
        if args.command == "block":
            result = bulk.block_many(tool.bans, steps, addresses, now, duration, run_shell)
        else:
            result = bulk.unblock_many(tool.bans, steps, addresses, now, run_shell)
        seconds = time.monotonic() - started
    finally:
        tool.close()
    for line in tool.log:
        print(line)
    verb = "blocked" if args.command == "block" else "unblocked"
    print(f"{verb} {result.done} of {len(addresses)} addresses from {source} in {seconds:.1f} s"
          + (f"; {len(result.skipped)} skipped" if result.skipped else "")
          + (f"; {result.failed_commands} commands failed" if result.failed_commands else ""))
    for reason in result.skipped[:20]:
        print(f"  skipped {reason}")
    if len(result.skipped) > 20:
        print(f"  ... and {len(result.skipped) - 20} more")
    return 1 if result.failed_commands else 0


def through_daemon(config: Config, args: argparse.Namespace) -> int | None:
    """list/block/unblock via the control socket; None when the daemon is not running."""
    from portsentry.service import admin

    message: dict[str, object] = {"command": args.command}
    if args.command in ("block", "unblock"):
        message["address"] = str(admin.parse_address(args.address))
    if args.command == "block" and args.duration:
        message["duration"] = admin.parse_duration(args.duration)
    try:
        answer = control.request(config.control_socket, message)
    except control.NotRunning:
        return None
    except PermissionError:
        print(f"portsentry: {config.control_socket}: permission denied (run as root)", file=sys.stderr)
        return 1
    if args.command == "list":
        rows = answer.get("bans", [])
        print(admin.as_json(rows) if args.json else admin.format_listing(rows))
        print("(via the running daemon)", file=sys.stderr)
        return 0
    for line in answer.get("lines", []):
        print(line)
    if answer.get("ok"):
        print(f"{args.command}: {args.address} done (via the running daemon)")
        return 0
    print(f"portsentry: {answer.get('error')}", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in and args_in[0] in ADMIN_COMMANDS:
        return admin_main(args_in)
    if args_in and args_in[0] == "demo":
        from portsentry.cli.demo import main as demo_main

        return demo_main(args_in[1:])
    try:
        modes, rest = split_modes(args_in)
    except UsageError as error:
        print(f"portsentry: {error}", file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(rest)
    modes += [Mode(value) for value in args.mode]
    modes = list(dict.fromkeys(modes))

    try:
        loaded = load_effective(args.config)
    except ConfigError as error:
        print(f"portsentry: {error}", file=sys.stderr)
        return 1
    for warning in loaded.warnings:
        print(f"portsentry: warning: {warning}", file=sys.stderr)

    if args.command == "check-config":
        return check_config(loaded, modes)
    if not modes:
        print(USAGE, file=sys.stderr)
        return 2
    return run(loaded.config, modes, args)


def check_config(loaded: LoadedConfig, modes: Sequence[Mode]) -> int:
    try:
        validate_for_modes(loaded.config, modes)
        source = open_ignore(loaded.config)
    except (ConfigError, IgnoreFileError) as error:
        print(f"portsentry: {error}", file=sys.stderr)
        return 1
    for warning in source.warnings:
        print(f"portsentry: warning: {warning}", file=sys.stderr)
    print(format_effective(loaded.config))
    print(f"ignore list: {len(source.current(time.time()))} entries (host addresses included)")
    print("configuration OK")
    return 0


def validate_for_modes(config: Config, modes: Sequence[Mode]) -> None:
    # Checked here rather than by the key table so that check-config, start and reload all refuse it.
    try:
        privileges.parse_keep(config.keep_capabilities)
    except ValueError as error:
        raise config.error("KEEP_CAPABILITIES", str(error)) from None
    for mode in modes:
        if mode in (Mode.TCP, Mode.STCP) and not config.tcp_ports:
            raise config.error("TCP_PORTS", f"is required by -{mode} but is not set")
        if mode in (Mode.UDP, Mode.SUDP) and not config.udp_ports:
            raise config.error("UDP_PORTS", f"is required by -{mode} but is not set")


def open_ignore(config: Config) -> IgnoreSource:
    source = IgnoreSource(config.ignore_file, local_addresses)
    try:
        source.load()
    except OSError as error:
        raise config.error("IGNORE_FILE", f"cannot read {config.ignore_file}: "
                           f"{error.strerror or error}") from error
    return source


def run(config: Config, modes: Sequence[Mode], args: argparse.Namespace) -> int:
    from portsentry.bans.lifecycle import BanManager, BanPolicy, open_store
    from portsentry.bans.store import StoreError
    from portsentry.responders.classic import ClassicResponder
    from portsentry.sensors.base import Sensor
    from portsentry.sensors.capture import CaptureError
    from portsentry.service.admin import open_backend, open_hosts_deny, store_path
    from portsentry.service.daemon import Daemon
    from portsentry.service.metrics import Metrics, MetricsError
    from portsentry.service.wiring import build_sensors

    syslog: SyslogWriter | JournaldWriter | None = None
    # Under systemd (stderr is the journal) or with --journald: structured journal entries;
    # tests pointing --syslog-socket elsewhere keep plain syslog.
    custom_socket = args.syslog_socket != DEFAULT_SOCKET
    if not args.no_syslog and not custom_socket and journald_available(args.journald):
        syslog = JournaldWriter()
    elif not args.no_syslog:
        syslog = SyslogWriter(args.syslog_socket)
    journal = Journal(syslog, config.history_file, config.blocked_file,
                      sys.stderr if args.log_stderr else None, verbose=args.verbose)
    journal.log(messages.starting(__version__))
    try:
        validate_for_modes(config, modes)
        ignore = open_ignore(config)
    except (ConfigError, IgnoreFileError) as error:
        print(f"portsentry: {error}", file=sys.stderr)
        journal.log(messages.config_error(str(error)))
        for line in messages.shutting_down():
            journal.log(line)
        return 1

    for warning in ignore.warnings:
        journal.log(f"adminalert: WARNING: {warning}")
    pid_file = None
    if args.pid_file:
        # Before forking, so that a refusal reaches the terminal; the lock passes to the child.
        try:
            pid_file = PidFile.acquire(args.pid_file)
        except PidFileError as error:
            print(f"portsentry: {error}", file=sys.stderr)
            journal.log(messages.config_error(str(error)))
            for line in messages.shutting_down():
                journal.log(line)
            return 1
    if args.daemon:
        daemonize()
    if pid_file is not None:
        pid_file.write(os.getpid())
    # Before anything is opened or any thread started: see privileges.py for why not later.
    dropped = privileges.restrict(privileges.parse_keep(config.keep_capabilities))
    journal.log(dropped.message, verbose=dropped.ok)

    hosts_deny = open_hosts_deny(config)
    metrics_server = None
    try:
        telemetry = open_telemetry(config, journal.failures)
        if config.metrics_listen and isinstance(telemetry.metrics, Metrics):
            metrics_server = telemetry.metrics.serve(config.metrics_listen)
        store, retry_path = open_store(store_path(config), journal.log)
        bans = BanManager(store, open_backend(config), hosts_deny, BanPolicy.from_config(config),
                          journal.log, telemetry=telemetry, failures=journal.failures)
        bans.fallback_from = retry_path
    except (ConfigError, StoreError, MetricsError, OSError) as error:
        print(f"portsentry: {error}", file=sys.stderr)
        journal.log(messages.config_error(str(error)))
        for line in messages.shutting_down():
            journal.log(line)
        if pid_file is not None:
            pid_file.release()
        return 1
    responder = ClassicResponder(hosts_deny, journal.log, config.command_timeout,
                                 verbose_log=lambda text: journal.log(text, verbose=True),
                                 telemetry=telemetry, failures=journal.failures)
    resolver = Resolver() if config.resolve_host else None
    def reload_config() -> tuple[Config, IgnoreSource]:
        new = load_effective(args.config).config
        validate_for_modes(new, modes)
        if new.keep_capabilities != config.keep_capabilities:
            # Dropped capabilities cannot be taken back; only a new process has them again.
            journal.log("adminalert: KEEP_CAPABILITIES changed: it takes effect at the next start")
        return new, open_ignore(new)

    def sensors_for(new: Config) -> list[Sensor]:
        return build_sensors(new, modes, journal.log, time.time, bans.backend)

    daemon = Daemon(config, modes, journal, ignore, sensors_for(config), responder, resolver, bans=bans,
                    reloader=reload_config, sensor_factory=sensors_for, control_path=config.control_socket,
                    telemetry=telemetry)
    daemon.install_signal_handlers()
    status = 0
    try:
        opened = daemon.open()
    except CaptureError as error:
        journal.log(messages.config_error(str(error)))
        print(f"portsentry: {error}", file=sys.stderr)
        opened = False
    if opened:
        daemon.run()
    else:
        daemon.shutdown()
        status = 1
    for line in messages.shutting_down():
        journal.log(line)
    journal.close()
    bans.store.close()
    telemetry.close()
    if metrics_server is not None:
        metrics_server.close()
    if pid_file is not None:
        pid_file.release()
    return status


class PidFileError(Exception):
    """The pid file cannot be used; the message says why."""


class PidFile:
    """--pid-file, held for the daemon's life: opened without following a symlink (a link planted
    there would make root truncate and write the file it points to) and locked with flock, so a
    second daemon given the same file refuses to start instead of overwriting the first one's
    pid, which rc scripts then use to signal it. A stale file from a daemon that died is not
    locked and is taken over. Removed at exit."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self._fd = fd
        self._identity = _identity(os.fstat(fd))

    @classmethod
    def acquire(cls, path: str) -> PidFile:
        # A daemon exiting removes the file between our open and our lock: then the inode we
        # locked is no longer the path's, and we try again with the new one.
        for _ in range(5):
            fd = cls._open(path)
            try:
                cls._lock(path, fd)
                try:
                    current = _identity(os.stat(path, follow_symlinks=False))
                except FileNotFoundError:
                    current = None
                if current == _identity(os.fstat(fd)):
                    return cls(path, fd)
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        raise PidFileError(f"{path}: the pid file keeps being replaced; is another portsentry starting?")

    @staticmethod
    def _open(path: str) -> int:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise PidFileError(f"{path}: refusing to use a symlink as the pid file") from None
            raise PidFileError(f"{path}: cannot open the pid file: {error.strerror or error}") from None
        st = os.fstat(fd)
        problem = None
        if not stat.S_ISREG(st.st_mode):
            problem = "it is not a regular file"
        elif st.st_nlink != 1:
            problem = f"it has {st.st_nlink} hard links"  # truncating it would truncate them
        elif st.st_uid != os.geteuid():
            problem = f"it belongs to uid {st.st_uid}"
        if problem:
            os.close(fd)
            raise PidFileError(f"{path}: refusing to use it as the pid file: {problem}")
        return fd

    @staticmethod
    def _lock(path: str, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise PidFileError(
                f"{path}: another portsentry (pid {holder}) holds this pid file; "
                "refusing to start a second daemon with it"
            ) from None

    def write(self, pid: int) -> None:
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{pid}\n".encode("ascii"), 0)

    def release(self) -> None:
        """Remove the file (if it is still ours) and let the lock go."""
        with contextlib.suppress(OSError):
            if _identity(os.stat(self.path, follow_symlinks=False)) == self._identity:
                os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.close(self._fd)


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def open_telemetry(config: Config, failures: WriteFailures | None = None) -> Telemetry:
    """The event log and metrics the configuration asks for (both off by default); failed event
    log writes are reported to `failures`."""
    from portsentry.journal.events import EventLog
    from portsentry.service.metrics import Metrics

    event_log = None
    if config.event_log:
        try:
            event_log = EventLog(config.event_log)
        except OSError as error:
            raise config.error("EVENT_LOG", f"cannot open {config.event_log}: "
                               f"{error.strerror or error}") from error
    return Telemetry(event_log, Metrics() if config.metrics_listen else None, failures)


def daemonize() -> None:
    """1.2's daemon(): fork, new session, cwd /, umask 077, standard streams to /dev/null."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    os.umask(0o077)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


if __name__ == "__main__":
    raise SystemExit(main())
