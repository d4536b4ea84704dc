"""A Daemon with no sensors, for the unit tests of its bookkeeping and its control requests."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from portsentry.config.ignore import IgnoreSource
from portsentry.config.settings import Config
from portsentry.core.probe import Mode
from portsentry.journal.journal import Journal
from portsentry.responders.classic import ClassicResponder
from portsentry.responders.hostsdeny import HostsDeny
from portsentry.service.daemon import Daemon


def bare_daemon(tmp_path: Path, bans: Any = None, clock: Any = None,
                telemetry: Any = None) -> tuple[Any, io.StringIO]:
    """The daemon (typed loosely: tests poke at its insides) and what its journal said."""
    said = io.StringIO()
    journal = Journal(None, stderr=said)
    config = Config(source="t", state_dir=str(tmp_path), protect_gateways=False, protect_resolvers=False)
    daemon = Daemon(config, [Mode.TCP], journal, IgnoreSource(None, lambda: []), [],
                    ClassicResponder(HostsDeny(str(tmp_path / "hosts.deny")), journal.log, 1.0),
                    bans=bans, clock=clock or (lambda: 1000.0), telemetry=telemetry)
    return daemon, said
