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
               "naming the file and the line; `portsentry check-config` shows the effective settings."),
    ]
    for title, keys in SECTIONS:
        lines += [f".SH {escape(title)}"]
        for key in keys:
            lines += [".TP", f"\\fB{escape(key)}\\fR (default: {escape(_default(key))})", escape(DOCS[key])]
    lines += [".SH FILES", "/etc/portsentry/portsentry.conf", ".SH SEE ALSO", "portsentry(8)"]
    return "\n".join(lines) + "\n"


def _options(parser: argparse.ArgumentParser) -> list[str]:
    lines: list[str] = []
    for action in parser._actions:  # argparse has no public list of its actions
        if not action.option_strings or action.help in (None, argparse.SUPPRESS):
            continue
        names = ", ".join(action.option_strings)
        metavar = f" {action.metavar}" if isinstance(action.metavar, str) else ""
        lines += [".TP", f"\\fB{escape(names)}\\fR{escape(metavar)}", escape(str(action.help))]
    return lines


def _commands(parser: argparse.ArgumentParser) -> list[str]:
    lines: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                lines += [".TP", f"\\fB{escape(choice.dest)}\\fR", escape(str(choice.help or ""))]
    return lines


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
        ".nf",
        escape(DESCRIPTION),
        ".fi",
        ".SH OPTIONS",
        *_options(build_parser()),
        ".SH COMMANDS",
        *_commands(build_admin_parser()),
        ".SH FILES",
        ".TP", "/etc/portsentry/portsentry.conf", "the configuration, portsentry.conf(5)",
        ".TP", "/etc/default/portsentry", escape("Debian's choice of modes, read with --debian-defaults"),
        ".TP", "/var/lib/portsentry/bans.sqlite3", "the ban store",
        ".TP", "/run/portsentry/control.sock", "the control socket",
        ".SH SIGNALS",
        escape("SIGHUP reloads the configuration and reopens the event log (logrotate's postrotate "
               "sends it; the history and blocked files are opened for every line anyway); SIGTERM "
               "and SIGINT stop."),
        ".SH SEE ALSO",
        "portsentry.conf(5), hosts_access(5), nft(8), fail2ban(1)",
    ]
    return "\n".join(lines) + "\n"


PAGES = {"portsentry.8": command_page, "portsentry.conf.5": conf_page}


def main(argv: list[str] | None = None) -> int:
    return write_generated(PAGES, "portsentry.cli.manpages", argv)


if __name__ == "__main__":
    raise SystemExit(main())
