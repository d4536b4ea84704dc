"""The admin subcommands' command line and the block/unblock/list paths cli.main's admin_main
takes: their parser, block/unblock --file straight on the store and the kernel (bulk_main), and
list/block/unblock through a running daemon's control socket (through_daemon). admin_main, which
picks among them, stays in cli.main with flush_main.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time

from portsentry.config.settings import Config
from portsentry.core import messages
from portsentry.journal.syslog import DEFAULT_SOCKET
from portsentry.service import audit, control

SYSLOG_SOCKET = DEFAULT_SOCKET  # --syslog-socket's default, read when a command runs
ADMIN_COMMANDS = ("block", "unblock", "list", "flush", "hosts-deny", "check", "status", "reload", "report")


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
    unblock.add_argument("--local", action="store_true",
                         help="lift it on this host only; without it a fleet (FLEET_REDIS_URL) lifts it too")
    for bulk in (block, unblock):
        bulk.add_argument("--file", metavar="FILE",
                          help="one address per line (# comments fine), - for standard input: all in "
                               "one go, one store transaction and one kernel batch")
    listing = command("list", "list active bans")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    flush = command("flush", "remove the native backend's table/sets, with the daemon stopped "
                             "(bans in the store stay)")
    for changes in (block, unblock, flush):
        # Where the command's own lines go when it works without the daemon (which logs for it).
        changes.add_argument("--syslog-socket", metavar="PATH",
                             help=f"syslog socket for this command's lines (default {DEFAULT_SOCKET})")
        changes.add_argument("--no-syslog", action="store_true",
                             help="write this command's lines to no syslog")
    tidy = command("hosts-deny", "hosts.deny upkeep")
    tidy.add_argument("action", choices=["tidy"])
    tidy.add_argument("--dry-run", action="store_true", help="show what would change, change nothing")
    command("check", "check the configuration and whether hosts.deny entries can have any effect")
    status = command("status", "is the daemon running, what it watches and blocked (exit 3: not running)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    command("reload", "re-read the configuration and ignore file (same as SIGHUP)")
    report = command("report", "what scanned this host, when, and what was done about it")
    report.add_argument("--since", default="24h", help="90m, 24h, 7d, 2w, or a date or time (default 24h)")
    report.add_argument("--format", choices=["text", "html", "json", "csv"], default="text")
    report.add_argument("-o", "--output", metavar="FILE", help="write here instead of standard output")
    return parser


def command_log(args: argparse.Namespace) -> audit.CommandLog:
    return audit.CommandLog(None if args.no_syslog else args.syslog_socket or SYSLOG_SOCKET)


def said_by_me(args: argparse.Namespace, log: audit.CommandLog, lines: list[str], error: str | None,
               outcome: str = "done") -> None:
    """What this command did, to syslog, and the line of who did it and how it ended
    (service.audit): when it works without the daemon, which then writes neither."""
    what = audit.action(args.command, getattr(args, "address", None),
                        getattr(args, "parsed_duration", "policy"), getattr(args, "local", False),
                        getattr(args, "file", None))
    by = audit.who(os.getuid(), os.getpid())
    log.say([*lines, messages.admin_done(what, by, outcome) if error is None
             else messages.admin_failed(what, by, error)])


def bulk_main(config: Config, args: argparse.Namespace, now: float, log: audit.CommandLog) -> int:
    """block/unblock --file: straight on the ban store and the kernel, running daemon or not
    (it follows the store's change feed, so it hears of every ban within a second)."""
    from portsentry.bans import bulk
    from portsentry.responders.shell import run_shell
    from portsentry.service import admin

    source = "<stdin>" if args.file == "-" else args.file
    try:
        if args.file == "-":
            # Decoded as the file is: the locale's strict decoder (PYTHONIOENCODING, a non-UTF-8
            # LANG) raised on the first stray byte.
            stdin = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace")
            try:
                addresses = bulk.read_addresses(bulk.feed_lines(stdin), source)
            finally:
                stdin.detach()  # sys.stdin's buffer stays open
        else:
            with open(args.file, encoding="utf-8", errors="replace") as handle:
                addresses = bulk.read_addresses(bulk.feed_lines(handle), source)
    except bulk.AddressListError as error:
        print(f"portsentry: {error}", file=sys.stderr)
        said_by_me(args, log, [], str(error))
        return 1
    duration: bulk.Duration = "policy"
    if args.command == "block" and args.duration:
        duration = args.parsed_duration = admin.parse_duration(args.duration)
    spared = admin.Spared.of_host(config) if args.command == "block" else admin.Spared()
    tool = admin.Admin.open(config)
    if args.command == "block" and (idle := admin.nothing_blocks(config, tool.bans)) is not None:
        tool.close()
        print(f"portsentry: block --file: {idle}: nothing blocked", file=sys.stderr)
        said_by_me(args, log, [], f"{idle}: nothing blocked")
        return 1
    try:
        steps = bulk.ManualSteps.from_config(config)
        started = time.monotonic()
        if args.command == "block":
            result = bulk.block_many(tool.bans, steps, addresses, now, duration, run_shell, spared.reason)
        else:
            result = bulk.unblock_many(tool.bans, steps, addresses, now, run_shell, local=args.local)
        seconds = time.monotonic() - started
    finally:
        tool.close()
    for line in tool.log:
        print(line)
    verb = "blocked" if args.command == "block" else "unblocked"
    summary = (f"{verb} {result.done} of {len(addresses)} addresses"
               + (f"; {len(result.skipped)} skipped" if result.skipped else "")
               + (f"; {result.failed_commands} commands failed" if result.failed_commands else "")
               + (f"; {result.failed_steps} steps failed" if result.failed_steps else ""))
    failed = bool(result.failed_commands or result.failed_steps)
    said_by_me(args, log, tool.log, summary if failed else None, summary)
    print(f"{verb} {result.done} of {len(addresses)} addresses from {source} in {seconds:.1f} s"
          + (f"; {len(result.skipped)} skipped" if result.skipped else "")
          + (f"; {result.failed_commands} commands failed" if result.failed_commands else "")
          + (f"; {result.failed_steps} steps failed (see above)" if result.failed_steps else ""))
    for reason in result.skipped[:20]:
        print(f"  skipped {reason}")
    if len(result.skipped) > 20:
        print(f"  ... and {len(result.skipped) - 20} more")
    return 1 if result.failed_commands or result.failed_steps else 0


def through_daemon(config: Config, args: argparse.Namespace) -> int | None:
    """list/block/unblock via the control socket; None when the daemon is not running."""
    from portsentry.service import adminio as admin

    message: dict[str, object] = {"command": args.command}
    address = None
    if args.command in ("block", "unblock"):
        address = admin.parse_address(args.address)
        message["address"] = str(address)
    if args.command == "block" and args.duration:
        message["duration"] = admin.parse_duration(args.duration)
    if args.command == "unblock" and args.local:
        message["local"] = True
    try:
        answer = control.request(config.control_socket, message)
    except control.NotRunning:
        return None
    except PermissionError:
        print(f"portsentry: {config.control_socket}: permission denied (run as root)", file=sys.stderr)
        return 1
    if args.command == "list" and answer.get("ok"):
        rows = answer.get("bans", [])
        print(admin.as_json(rows) if args.json else admin.format_listing(rows))
        print("(via the running daemon)", file=sys.stderr)
        return 0
    for line in answer.get("lines", []):
        print(line)
    if answer.get("ok"):
        print(f"{args.command}: {address} done (via the running daemon)")
        return 0
    print(f"portsentry: {answer.get('error')}", file=sys.stderr)
    return 1
