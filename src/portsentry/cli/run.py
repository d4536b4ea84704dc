"""Starting the daemon from the command line: check-config, the configuration checks a start and a
reload share, the pid file, and `run`, which wires the daemon together and runs it.

Apart from cli.main so that the admin commands (`portsentry list`, `status`...) do not import the
whole daemon: their start-up is most of their wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import fcntl
import os
import signal
import stat
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from portsentry import __version__
from portsentry.config.ignore import IgnoreFileError, IgnoreSource
from portsentry.config.ignore import open_ignore as load_ignore_source
from portsentry.config.settings import (
    KEYS,
    Config,
    ConfigError,
    LoadedConfig,
    format_effective,
    load_effective,
)
from portsentry.core import messages
from portsentry.core.probe import Mode
from portsentry.host import privileges
from portsentry.host.info import local_addresses
from portsentry.journal.failures import SYSLOG, WriteFailures
from portsentry.journal.journal import Journal
from portsentry.journal.journald import JournaldWriter, journald_available, stderr_is_journal
from portsentry.journal.syslog import DEFAULT_SOCKET, SyslogWriter
from portsentry.journal.telemetry import Telemetry
from portsentry.service.resolver import Resolver

if TYPE_CHECKING:
    from portsentry.bans.lifecycle import BanManager
    from portsentry.fleet.node import FleetNode
    from portsentry.fleet.settings import FleetSettings


def check_config(loaded: LoadedConfig, modes: Sequence[Mode], modes_from: str = "command line") -> int:
    try:
        validate_for_modes(loaded.config, modes)
        source = open_ignore(loaded.config)
        # Only the start reads the fleet's settings (reload keeps the fleet it has), but a
        # check-config that passes what the start refuses is no check.
        checked_fleet_settings(loaded.config)
    except (ConfigError, IgnoreFileError) as error:
        print(f"portsentry: {error}", file=sys.stderr)
        return 1
    for warning in source.warnings:
        print(f"portsentry: warning: {warning}", file=sys.stderr)
    print(format_effective(loaded.config))
    print(f"ignore list: {len(source.current(time.time()))} entries (host addresses included)")
    if modes:  # init scripts show this line rather than work the modes out themselves
        print(f"modes: {' '.join(f'-{mode}' for mode in modes)} ({modes_from})")
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
    """The ignore list in force, with this host's addresses (config.ignore.open_ignore)."""
    return load_ignore_source(config, local_addresses)


def run(config: Config, modes: Sequence[Mode], args: argparse.Namespace,
        warnings: Sequence[str] = ()) -> int:
    """The daemon; `warnings`: what the configuration file has that is not honoured (main()
    printed them for the terminal; syslog, where 1.2 said everything, gets them too)."""
    # A stop asked while the daemon starts (Ctrl-C, an rc script's stop right after its start)
    # waits for the daemon's handlers: SIGTERM's default killed it with its pid file left and no
    # shutdown line, SIGINT raised through a start half made.
    stops: list[int] = []
    saved = {sig: signal.signal(sig, lambda signum, _frame: stops.append(signum))
             for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _run(config, modes, args, warnings, stops)
    finally:
        for sig, handler in saved.items():
            if handler is not None:  # None: not set from Python, so nothing to put back
                signal.signal(sig, handler)


def _run(config: Config, modes: Sequence[Mode], args: argparse.Namespace, warnings: Sequence[str],
         stops: list[int]) -> int:
    from portsentry.bans.lifecycle import BanManager, BanPolicy, open_store
    from portsentry.bans.store import StoreError
    from portsentry.responders.classic import ClassicResponder
    from portsentry.sensors.base import Sensor
    from portsentry.sensors.capture import CaptureError
    from portsentry.service.admin import auto_fallback, open_backend, open_hosts_deny, store_path
    from portsentry.service.daemon import Daemon
    from portsentry.service.metrics import Metrics, MetricsError
    from portsentry.service.wiring import build_sensors

    # Until the daemon's handlers are in place, a reload or logrotate's reopen signal must not
    # kill a daemon that is starting (both signals' default action is to terminate).
    for early in (signal.SIGHUP, signal.SIGUSR1):
        signal.signal(early, signal.SIG_IGN)
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
    refused = privileges.refusal()
    if refused is not None:  # as 1.2: before the start line, ended by the shutdown lines
        print(f"portsentry: {refused}", file=sys.stderr)
        journal.log(f"adminalert: ERROR: {refused}")
        for line in messages.shutting_down():
            journal.log(line)
        return 1
    journal.log(messages.starting(__version__))
    lost = [f for f in journal.failures.snapshot() if f["file"] == SYSLOG]
    if syslog is not None and lost and not args.log_stderr:
        # In the foreground with no syslog daemon, every line went nowhere, this failure's too.
        print(f"portsentry: cannot write syslog {syslog.path}: {lost[0]['last_error']}; its lines are "
              "lost (--log-stderr shows them here)", file=sys.stderr)
    try:
        validate_for_modes(config, modes)
        ignore = open_ignore(config)
    except (ConfigError, IgnoreFileError) as error:
        print(f"portsentry: {error}", file=sys.stderr)
        journal.log(messages.config_error(str(error)))
        for line in messages.shutting_down():
            journal.log(line)
        return 1

    for warning in (*warnings, *ignore.warnings):
        journal.log(f"adminalert: WARNING: {warning}")

    def notice(line: str) -> None:
        """What the admin must hear of the start: syslog, and the terminal where the journal
        does not say it there (--log-stderr, or stderr is the journal under systemd)."""
        journal.log(line)
        if not (args.log_stderr or (stderr_is_journal() and not args.no_syslog)):
            print(f"portsentry: {line.removeprefix('adminalert: ')}", file=sys.stderr)

    control_path: str | None = config.control_socket
    other = daemon_answering(config.control_socket)
    if other is not None:
        # 1.2 ran one mode per process, and rc scripts written for it still start two; the
        # second used to take the socket over, after which status, list and reload reached it
        # alone, and once it stopped, `portsentry status` called the first "not running".
        warning = (f"adminalert: WARNING: {other} answers on the control socket "
                   f"{config.control_socket}; this one runs without it, so status, list, block, "
                   "unblock and reload reach that one only (run every mode in one process, e.g. "
                   "portsentry -tcp -udp, or give each its own CONTROL_SOCKET)")
        print(f"portsentry: {warning.removeprefix('adminalert: ')}", file=sys.stderr)
        journal.log(warning)
        control_path = None
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
        store, retry_path, store_error = open_store(store_path(config), notice)
        bans = BanManager(store, open_backend(config), hosts_deny, BanPolicy.from_config(config),
                          journal.log, telemetry=telemetry, failures=journal.failures)
        bans.fallback_from, bans.fallback_error = retry_path, store_error
        if (fallback := auto_fallback(config, bans.backend)) is not None:
            notice(f"adminalert: WARNING: {fallback}")
        fleet = open_fleet(config, bans, journal.log, telemetry)
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
    noted = [ignore.note]  # the stand-in ignore file, said once while it stays the same

    def reload_config() -> tuple[Config, IgnoreSource]:
        loaded = load_effective(args.config)
        validate_for_modes(loaded.config, modes)
        new, waiting = keep_start_only(config, loaded.config)
        source = open_ignore(new)
        # What a start says (a misspelled key ignored, an ignore entry meaning a whole network),
        # a reload says too: its log line is all the admin sees of the files it read.
        for warning in (*loaded.warnings, *source.warnings):
            if warning != noted[0]:
                journal.log(f"adminalert: WARNING: {warning}")
        noted[0] = source.note
        if waiting:
            journal.log(f"adminalert: {', '.join(waiting)} changed: "
                        f"{'it takes' if len(waiting) == 1 else 'they take'} effect at the next start")
        return new, source

    def sensors_for(new: Config) -> list[Sensor]:  # at a reload
        return build_sensors(new, modes, journal.log, time.time, bans.backend, at_start=False)

    sensors = build_sensors(config, modes, journal.log, time.time, bans.backend)
    daemon = Daemon(config, modes, journal, ignore, sensors, responder, resolver, bans=bans,
                    reloader=reload_config, sensor_factory=sensors_for, control_path=control_path,
                    telemetry=telemetry, fleet=fleet)
    daemon.install_signal_handlers()
    if stops:
        daemon.request_stop()
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


# What a reload cannot change: capabilities dropped for good, the ban backend (its nftables table,
# hook, priority and set size) and the fleet link built at start, the state directory, sockets and
# files opened then (hosts.deny: the lines of bans in force are in the old one), the resolver made
# or not.
START_ONLY_KEYS = ("KEEP_CAPABILITIES", "BAN_BACKEND", "NFT_TABLE", "NFT_HOOK", "NFT_PRIORITY",
                   "BAN_SET_SIZE", "HOSTS_DENY_FILE", "STATE_DIR", "CONTROL_SOCKET", "EVENT_LOG",
                   "METRICS_LISTEN", "RESOLVE_HOST", "FLEET_REDIS_URL", "FLEET_NAME", "FLEET_HOST_ID",
                   "FLEET_KEY_FILE", "FLEET_PASSWORD_FILE", "FLEET_ACCEPT_HOSTS", "FLEET_BAN_RATE_LIMIT")


def keep_start_only(running: Config, new: Config) -> tuple[Config, list[str]]:
    """`new` with the running values of START_ONLY_KEYS, and the keys whose value it changed.
    Taken as read, a new BAN_BACKEND had the engine ask for native bans of a backend never made
    (every such block failed), and status show settings that were not in force."""
    fields = {key: KEYS[key].field for key in START_ONLY_KEYS}
    waiting = [key for key, name in fields.items() if getattr(new, name) != getattr(running, name)]
    kept = dataclasses.replace(new, **{fields[key]: getattr(running, fields[key]) for key in waiting})
    return kept, waiting


def daemon_answering(path: str) -> str | None:
    """Who already listens on the control socket `path` ("another portsentry (pid N)"), or None
    when nobody does (no socket, a stale one left by a daemon that died, or one this user may
    not open)."""
    from portsentry.service import control

    try:
        answer = control.request(path, {"command": "status"}, timeout=5.0)
    except control.NotRunning:
        return None
    except PermissionError:
        # Root's socket seen by another user: nothing says anyone listens there (a start
        # without sudo claimed "another process answers" with no daemon running); binding it
        # fails next with the reason.
        return None
    except OSError:  # it listens but does not answer as a daemon does (NoAnswer, a timeout)
        return "another process"
    status = answer.get("status")
    pid = status.get("pid") if isinstance(status, dict) else None
    return f"another portsentry (pid {pid})" if isinstance(pid, int) else "another portsentry"


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


def open_fleet(config: Config, bans: BanManager, log: Callable[[str], None],
               telemetry: Telemetry) -> FleetNode | None:
    """The fleet node FLEET_REDIS_URL asks for (None: no fleet); ConfigError when its settings
    are unusable or the redis package is missing."""
    from portsentry.fleet.node import FleetNode

    settings = checked_fleet_settings(config)
    if settings is None:
        return None
    return FleetNode(settings, bans, config.state_dir, log, telemetry, hosts_deny=config.kill_hosts_deny)


def checked_fleet_settings(config: Config) -> FleetSettings | None:
    """The fleet's settings (None: no fleet); ConfigError when they are unusable or the redis
    package is missing."""
    from portsentry.fleet.settings import fleet_settings

    settings = fleet_settings(config)
    if settings is None:
        return None
    try:
        import redis  # noqa: F401  (the optional dependency, checked before the daemon starts)
    except ImportError:
        raise config.error("FLEET_REDIS_URL", "the fleet needs the redis package: "
                           "pip install 'portsentry[fleet]'") from None
    return settings


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
