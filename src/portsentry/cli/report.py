"""`portsentry report`: read the ban store (read-only), render one format, write it."""

from __future__ import annotations

import argparse
import os
import sys

from portsentry.config.settings import Config
from portsentry.report.data import ReportError, build, open_read_only
from portsentry.report.render import FORMATS
from portsentry.report.since import SinceError, parse_since


def report_main(config: Config, args: argparse.Namespace, now: float) -> int:
    try:
        since = parse_since(args.since, now)
        db = open_read_only(os.path.join(config.state_dir, "bans.sqlite3"))
    except (SinceError, ReportError) as error:
        print(f"portsentry: {error}", file=sys.stderr)
        return 1
    try:
        output = FORMATS[args.format](build(db, since, now))
    except ReportError as error:
        print(f"portsentry: {error}", file=sys.stderr)
        return 1
    finally:
        db.close()
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            handle.write(output)
    else:
        sys.stdout.write(output)
    return 0
