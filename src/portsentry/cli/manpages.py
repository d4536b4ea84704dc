"""portsentry(8) and portsentry.conf(5), generated: the options from the argument parsers, the
keys from the configuration key table (config.settings.KEYS, with its defaults) and their texts
(config.keydocs). `python -m portsentry.cli.manpages DIR` writes both into DIR; the copies in
packaging/man are checked against a fresh run by the tests, so they never drift.
"""

from __future__ import annotations

import argparse
import dataclasses

from portsentry import __version__
from portsentry.cli.completion import write_generated
from portsentry.cli.main import DESCRIPTION, SYNOPSIS, build_admin_parser, build_parser
from portsentry.config.keydocs import DOCS, SECTIONS
from portsentry.config.settings import KEYS, Config
from portsentry.core.ports import format_ports

DATE = "2026-12-05"  # of the page's text; the version says which release it describes


def escape(text: str) -> str:
    """Text for a man page line: backslashes and hyphens escaped, no line starting a request."""
    out = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line for line in out.splitlines())


def _default(key: str) -> str:
    defaults = {f.name: f.default for f in dataclasses.fields(Config)
                if f.default is not dataclasses.MISSING}
    value = defaults.get(KEYS[key].field)
    if value is None or value == () or value == "":
        return "unset"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, tuple) and all(isinstance(v, int) for v in value):
        return format_ports(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def conf_page() -> str:
    lines = [
        f'.TH PORTSENTRY.CONF 5 "{DATE}" "portsentry {__version__}" "File Formats"',
        ".SH NAME",
        "portsentry.conf \\- configuration of the portsentry port scan detector",
        ".SH DESCRIPTION",
        escape("One KEY=\"value\" per line; # starts a comment. The keys of PortSentry 1.2 keep their "
               "meaning; the others are this version's. An unknown key or a bad value is an error "
               "naming the file and the line; `portsentry check-config` shows the effective settings. "
               "Every file and directory is named by its absolute path: with --daemon the daemon "
               "works from /, as 1.2 did, so a relative one is refused."),
    ]
    for title, keys in SECTIONS:
        lines += [f".SH {escape(title)}"]
        for key in keys:
            lines += [".TP", f"\\fB{escape(key)}\\fR (default: {escape(_default(key))})", escape(DOCS[key])]
    lines += [".SH FILES", "/etc/portsentry/portsentry.conf", ".SH SEE ALSO", "portsentry(8)"]
    return "\n".join(lines) + "\n"


def _option_lines(parser: argparse.ArgumentParser, with_help: bool = True) -> list[str]:
    lines: list[str] = []
    for action in parser._actions:  # argparse has no public list of its actions
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        if isinstance(action, argparse._HelpAction) and not with_help:
            continue
        names = ", ".join(action.option_strings)
        if action.nargs == 0:
            value = ""
        elif isinstance(action.metavar, str):
            value = f" {action.metavar}"
        elif action.choices:
            value = " " + "|".join(str(choice) for choice in action.choices)
        else:
            value = f" {action.dest.upper()}"  # what argparse's own usage shows
        text = str(action.help or "")
        if action.help and action.default not in (None, False, [], argparse.SUPPRESS) \
                and "default" not in text:
            text += f" (default {action.default})"
        lines += [".TP", f"\\fB{escape(names)}\\fR{escape(value)}", escape(text)]
    return lines


def _command_lines(parser: argparse.ArgumentParser) -> list[str]:
    lines: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: str(choice.help or "") for choice in action._choices_actions}
            for name, sub in action.choices.items():
                words = [f"[{a.dest.upper()}]" if a.nargs == "?"
                         else "|".join(map(str, a.choices or [a.dest]))
                         for a in sub._actions if not a.option_strings]
                lines += [".TP", f"\\fB{escape(name)}\\fR {escape(' '.join(words))}".rstrip(),
                          escape(helps[name]), ".RS", *_option_lines(sub, with_help=False), ".RE"]
    return lines


def _entries(*pairs: tuple[str, str]) -> list[str]:
    return [line for term, text in pairs for line in (".TP", escape(term), escape(text))]


def command_page() -> str:
    lines = [
        f'.TH PORTSENTRY 8 "{DATE}" "portsentry {__version__}" "System Administration"',
        ".SH NAME",
        "portsentry \\- detect port scans and stealth scans and block the scanner",
        ".SH SYNOPSIS",
        ".nf",
        *[escape(line.strip()) for line in SYNOPSIS.splitlines()],
        ".fi",
        ".SH DESCRIPTION",
        escape("PortSentry 1.2 rebuilt: it reads 1.2's portsentry.conf(5) and ignore file unchanged, "
               "takes the same mode flags and writes the same syslog, history and hosts.deny lines, "
               "so tools reading them (fail2ban's portsentry filter) keep working. It stays in the "
               "foreground unless given --daemon."),
        ".PP",
        ".nf",
        escape(DESCRIPTION),
        ".fi",
        ".SH OPTIONS",
        *_option_lines(build_parser()),
        ".SH COMMANDS",
        escape("The first word of the command line; each takes -c FILE for another configuration."),
        *_command_lines(build_admin_parser()),
        ".TP", "\\fBdemo\\fR", escape("a real scan caught, between two throwaway network namespaces"),
        ".SH FILES",
        *_entries(
            ("/etc/portsentry/portsentry.conf", "the configuration, see portsentry.conf(5)"),
            ("/etc/portsentry/portsentry.ignore", "addresses never blocked (IGNORE_FILE); when it is "
             "missing, or Debian's init script generated it, and portsentry.ignore.static exists, "
             "that is used"),
            ("/etc/default/portsentry", "Debian's choice of modes, TCP_MODE (tcp, stcp, atcp or empty) "
             "and UDP_MODE (udp, sudp, audp or empty): with --debian-defaults, when the file exists "
             "and sets either, they replace the mode flags; the file is parsed, never run"),
            ("/var/lib/portsentry/portsentry.history", "every block, in 1.2's format (HISTORY_FILE)"),
            ("/var/lib/portsentry/bans.sqlite3", "the ban store (STATE_DIR)"),
            ("/run/portsentry/control.sock", "the control socket of status, list, block, unblock, reload"),
            ("/run/portsentry.pid", "the SysV init script's --pid-file"),
        ),
        ".SH SIGNALS",
        *_entries(
            ("SIGHUP", "re-read the configuration and the ignore file (a broken configuration is "
             "refused and the running one stays) and reopen the event log"),
            ("SIGUSR1", "reopen the event log and nothing else: logrotate's postrotate sends it. The "
             "history and blocked files are opened for every line and need no signal"),
            ("SIGTERM, SIGINT", "stop, after the blocks under way"),
        ),
        ".SH EXIT STATUS",
        escape("0 on success; 1 when the configuration or a command fails; 2 for a usage error; 3 from "
               "status and reload when the daemon is not running; 4 from status when it cannot tell (the "
               "control socket is root's, or the daemon answered with an error or not at all). block and "
               "unblock end alike whether the daemon answers them or not: 0 with \"block: ADDRESS done\" (or "
               "unblock) on standard output; 1 with \"ADDRESS is not blocked\" from unblock, "
               "\"could not block ADDRESS\" or the reason for a refusal (the ignore list, this "
               "host's own addresses, its gateways and resolvers) on standard error; 1 also when the "
               "ban was recorded (or lifted) but one of its steps failed: the failed steps' log lines "
               "on standard output, and \"ADDRESS is blocked, but not everywhere: ...\" (or "
               "unblocked) on standard error."),
        ".SH SEE ALSO",
        "portsentry.conf(5), hosts_access(5), nft(8), fail2ban(1), logrotate(8)",
    ]
    return "\n".join(lines) + "\n"


PAGES = {"portsentry.8": command_page, "portsentry.conf.5": conf_page}


def main(argv: list[str] | None = None) -> int:
    return write_generated(PAGES, "portsentry.cli.manpages", argv)


if __name__ == "__main__":
    raise SystemExit(main())
