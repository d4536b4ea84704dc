"""The `portsentry` command: 1.2's mode flags, the modern `run` spelling, and admin_main, which
sends each admin subcommand its way (their parser and the block/unblock/list paths are
cli.admin_commands'; flush_main is here).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from portsentry import __version__
from portsentry.cli.admin_commands import ADMIN_COMMANDS as ADMIN_COMMANDS
from portsentry.cli.admin_commands import build_admin_parser as build_admin_parser
from portsentry.cli.admin_commands import bulk_main, command_log, said_by_me, through_daemon
from portsentry.config.settings import Config, ConfigError, load_effective
from portsentry.core.probe import Mode
from portsentry.journal.journald import stderr_is_journal
from portsentry.journal.syslog import DEFAULT_SOCKET
from portsentry.service import audit, control
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
       portsentry status | list | block ADDR | unblock ADDR | reload | flush | report   [-c FILE]
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
    parser.add_argument("--debian-defaults", metavar="FILE",
                        help="take the modes from Debian's /etc/default/portsentry (TCP_MODE, UDP_MODE) "
                             "when FILE exists; the mode flags given apply only when it does not")
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


def admin_main(argv: Sequence[str]) -> int:
    # The store, the backends and the lifecycle are imported only where a command needs them:
    # `portsentry list` answered by the daemon then starts in a fraction of the time.
    from portsentry.bans.records import StoreError
    from portsentry.service.adminio import AdminError

    args = build_admin_parser().parse_args(argv)
    # Ban changes made here, not by the daemon, are said in syslog here (service.audit).
    log = command_log(args) if args.command in ("block", "unblock", "flush") else None
    try:
        loaded = load_effective(args.config)
        config = loaded.config
        now = time.time()
        if args.command == "check":
            from portsentry.cli.run import check_config
            from portsentry.host.wrappers_check import check_wrappers

            for warning in loaded.warnings:  # as check-config prints them
                print(f"portsentry: warning: {warning}", file=sys.stderr)
            status = check_config(loaded, [])
            warnings = check_wrappers()
            for warning in warnings:
                print(f"warning: {warning}")
            return status
        if args.command == "flush":
            assert log is not None
            return flush_main(config, args, log)
        if args.command == "hosts-deny":
            from portsentry.bans.store import BanStore
            from portsentry.bans.tidy import format_report, tidy_hosts_deny
            from portsentry.responders.hostsdeny import HostsDenyError
            from portsentry.service import admin

            # A dry run makes no store where there is none: with no store no line is ours anyway.
            path = admin.store_path(config)
            store = None if args.dry_run and not os.path.exists(path) else BanStore(path)
            try:
                report = tidy_hosts_deny(config.hosts_deny_file, store, now, args.dry_run,
                                         lock_path=admin.hosts_deny_lock_path(config))
            except HostsDenyError as error:  # a symlink, a world-writable file: its text says which
                print(f"portsentry: {error}", file=sys.stderr)
                return 1
            finally:
                if store is not None:
                    store.close()
            print(format_report(report, path=config.hosts_deny_file, dry_run=args.dry_run))
            return 0
        if args.command == "status":
            return show_status(config, args.json, now)
        if args.command == "report":
            from portsentry.cli.report import report_main

            return report_main(config, args, now)
        if args.command == "reload":
            try:
                answer = control.request(config.control_socket, {"command": "reload"})
            except control.NotRunning:
                print("portsentry is not running", file=sys.stderr)
                return NOT_RUNNING
            except PermissionError:  # as list, block, unblock and status say it
                print(f"portsentry: {config.control_socket}: permission denied (run as root)",
                      file=sys.stderr)
                return 1
            if not answer.get("ok"):
                print(f"portsentry: {answer.get('error')}", file=sys.stderr)
                return 1
            print("reloaded")
            return 0
        if args.command in ("block", "unblock"):
            if (args.address is None) == (args.file is None):
                print(f"portsentry: {args.command}: give an ADDRESS or --file FILE", file=sys.stderr)
                return 2
            if args.file is not None:
                assert log is not None
                return bulk_main(config, args, now, log)
        via_daemon = through_daemon(config, args)
        if via_daemon is not None:
            if log is not None:
                log.said = True  # the daemon said it, or the command never reached it
            return via_daemon
        print("(the daemon is not running: working on the ban store directly)", file=sys.stderr)
        from portsentry.service import admin

        if args.command == "list" and not os.path.exists(admin.store_path(config)):
            # No store yet (the daemon never ran here): no bans, and a command that only reads
            # makes no STATE_DIR or store.
            print(admin.as_json([]) if args.json else admin.format_listing([]))
            return 0
        tool = admin.Admin.open(config, setup=args.command != "list")
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
                else:
                    args.parsed_duration = duration
                outcome = tool.block(address, duration, now)
            else:
                outcome = tool.unblock(address, now, local=args.local)
            assert log is not None
            # Not done, or done with steps that failed (their lines are in tool.log): exit 1.
            why = outcome.error(args.command, address)
            said_by_me(args, log, tool.log, why)
            for line in tool.log:
                print(line)
            # The words and exit codes through_daemon gives: scripts must not care which path ran.
            if why is None:
                print(f"{args.command}: {address} done")
            else:
                print(f"portsentry: {why}", file=sys.stderr)
            return 0 if why is None else 1
        finally:
            tool.close()
    except BrokenPipeError:
        raise  # the reader left (`portsentry list | head`): main ends quietly, as a shell expects
    except (ConfigError, AdminError, StoreError, OSError) as error:
        print(f"portsentry: {error}", file=sys.stderr)
        if log is not None and not log.said:
            said_by_me(args, log, [], str(error))
        return 1
    finally:
        if log is not None:
            log.close()


# Seconds `flush` waits for a daemon's answer to whether it runs (as `status` does).
FLUSH_ASK_TIMEOUT = 10.0


def flush_main(config: Config, args: argparse.Namespace, log: audit.CommandLog) -> int:
    """Remove the native backend's table, sets or routes; the bans in the store stay. What it
    did, or why not, also goes to syslog with who asked (service.audit)."""
    removed, outcome = _flush(config)
    if removed:
        print(outcome)
    else:
        print(f"portsentry: flush: {outcome}", file=sys.stderr)
    said_by_me(args, log, [], None if removed else outcome, outcome)
    return 0 if removed else 1


def _flush(config: Config) -> tuple[bool, str]:
    """Whether it worked (or there was nothing to do), and what it did or why not."""
    from portsentry.host import privileges
    from portsentry.responders.backend import BackendError
    from portsentry.service import admin

    if config.ban_backend == "none":
        return True, "no native ban backend configured (BAN_BACKEND)"
    # Asked first: without CAP_NET_ADMIN "auto" finds no nftables it may list and picks the
    # routes, whose flush of nothing it may see "succeeds": "removed" while the table stayed.
    if privileges.lacks("CAP_NET_ADMIN"):
        return False, ("only root (CAP_NET_ADMIN) may remove the ban backend's table, sets or routes: "
                       "nothing removed")
    try:
        answer = control.request(config.control_socket, {"command": "status"}, timeout=FLUSH_ASK_TIMEOUT)
    except TimeoutError:
        # It took the question (stopped, or its loop busy with a long restore at its start), so
        # a daemon is there: as `status` takes it, running, and its repair would undo the flush.
        return False, (f"a daemon at {config.control_socket} took the question and did not answer "
                       f"within {FLUSH_ASK_TIMEOUT:g} s: running, it would put it all back within a "
                       "minute: stop it first, then flush; nothing removed")
    except (control.NotRunning, OSError):
        answer = None  # none there, or one that hung up unanswered (stopping): nothing puts it back
    if answer is not None:
        # Its repair, once a minute, finds the table gone and rebuilds it with every ban.
        state = answer.get("status")
        pid = f" (pid {state['pid']})" if isinstance(state, dict) and "pid" in state else ""
        return False, (f"the daemon is running{pid} and would put it all back within a minute: "
                       "stop it first, then flush; nothing removed")
    backend = admin.open_backend(config, setup=False)
    if backend is None:
        return True, "BAN_BACKEND=\"auto\" finds no working ban backend here: nothing to remove"
    try:
        removed = backend.teardown()
    except BackendError as error:
        return False, str(error)
    if removed is None:
        return True, f"nothing to remove: no {backend.owned()} here"
    return True, f"removed {backend.name}: {removed}"


# What a shell reports for a command killed by SIGPIPE (128 + 13) and by SIGINT (128 + 2).
EXIT_BROKEN_PIPE = 141
EXIT_INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        # Ctrl-C at `block --file -` or a long report: the admin asked for it, no traceback.
        # What was under way unwound through its finally blocks (a store transaction rolled back).
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `portsentry check-config | head`: the reader left, which is no error worth a traceback.
        # stdout goes to /dev/null so that the flush at exit does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE


def _main(argv: Sequence[str] | None) -> int:
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
    # --daemon changes to /, and a reload reads -c again afterwards, the pid file is removed
    # at exit and the syslog socket reopened: relative paths must mean what they meant here.
    for name in ("config", "pid_file", "syslog_socket"):
        if getattr(args, name):
            setattr(args, name, os.path.abspath(getattr(args, name)))
    modes += [Mode(value) for value in args.mode]
    modes = list(dict.fromkeys(modes))
    modes_from = "command line"
    if args.debian_defaults:
        from portsentry.config.debian import DefaultsError, read_defaults

        try:
            chosen = read_defaults(args.debian_defaults)
        except DefaultsError as error:
            print(f"portsentry: {error}", file=sys.stderr)
            return 1
        if chosen is not None:
            if not chosen:
                print(f"portsentry: {args.debian_defaults}: TCP_MODE and UDP_MODE are both empty: "
                      "nothing to watch", file=sys.stderr)
                return 1
            modes = chosen
            modes_from = f"TCP_MODE, UDP_MODE in {args.debian_defaults}"

    try:
        loaded = load_effective(args.config)
    except ConfigError as error:
        print(f"portsentry: {error}", file=sys.stderr)
        return 1
    # The daemon logs them itself: to the journal, which is stderr under systemd, and echoed to
    # stderr with --log-stderr; printed here too, each was said twice there.
    said_by_daemon = args.command != "check-config" and (
        args.log_stderr or (stderr_is_journal() and not args.no_syslog))
    if not said_by_daemon:
        for warning in loaded.warnings:
            print(f"portsentry: warning: {warning}", file=sys.stderr)

    from portsentry.cli.run import check_config, run  # the daemon's imports, only when needed

    if args.command == "check-config":
        return check_config(loaded, modes, modes_from)
    if not modes:
        print(USAGE, file=sys.stderr)
        return 2
    return run(loaded.config, modes, args, loaded.warnings)


if __name__ == "__main__":
    raise SystemExit(main())
