"""Starting the daemon from the command line: `run`, which wires the daemon together and runs it
(the checks it shares with check-config and reload are in cli.checks, the pid file and the fork
in cli.pidfile).

Apart from cli.main so that the admin commands (`portsentry list`, `status`...) do not import the
whole daemon: their start-up is most of their wall time.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from portsentry import __version__
from portsentry.cli.checks import START_ONLY_KEYS as START_ONLY_KEYS
from portsentry.cli.checks import check_config as check_config
from portsentry.cli.checks import checked_fleet_settings as checked_fleet_settings
from portsentry.cli.checks import keep_start_only as keep_start_only
from portsentry.cli.checks import open_ignore as open_ignore
from portsentry.cli.checks import validate_for_modes as validate_for_modes
from portsentry.cli.pidfile import PidFile as PidFile
from portsentry.cli.pidfile import PidFileError as PidFileError
from portsentry.cli.pidfile import daemonize as daemonize
from portsentry.config.ignore import IgnoreFileError, IgnoreSource
from portsentry.config.settings import Config, ConfigError, load_effective
from portsentry.core import messages
from portsentry.core.probe import Mode
from portsentry.host import privileges
from portsentry.journal.failures import SYSLOG, WriteFailures
from portsentry.journal.journal import Journal
from portsentry.journal.journald import JournaldWriter, journald_available, stderr_is_journal
from portsentry.journal.syslog import DEFAULT_SOCKET, SyslogWriter
from portsentry.journal.telemetry import Telemetry
from portsentry.service.resolver import Resolver

if TYPE_CHECKING:
    from portsentry.bans.lifecycle import BanManager
    from portsentry.fleet.node import FleetNode


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
