"""The table the last run used (bans.previous) at a start that then fails: it keeps its bans."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from portsentry.bans.lifecycle import BanManager, BanPolicy
from portsentry.bans.store import MEMORY, BanStore
from portsentry.responders.backend import RunResult
from portsentry.responders.hostsdeny import HostsDeny
from portsentry.responders.nftables import NftablesBackend
from portsentry.sensors.capture import CaptureError
from tests.unit.responders.test_backend import Recorder
from tests.unit.service.daemons import bare_daemon

# No process has this pid (above the kernel's pid_max): the last run is gone.
GONE = 4194304 + 17


class Unopenable:
    """A sensor whose capture cannot open (NFLOG group taken, no CAP_NET_RAW)."""

    def open(self) -> list[Any]:
        raise CaptureError("cannot set up NFLOG group 5: Device or resource busy")

    def close(self) -> None:
        pass


def _kernel(*tables: str) -> Recorder:
    listing = json.dumps({"nftables": [{"table": {"family": "inet", "name": name}} for name in tables]})
    return Recorder({("nft", "-j", "list", "tables"): RunResult(0, listing, "")})


def _daemon(tmp_path: Path, rec: Recorder) -> Any:
    (tmp_path / "nft-table").write_text(f"psold {GONE}\n")
    backend = NftablesBackend(table="psnew", runner=rec, mechanism="cli")
    bans = BanManager(BanStore(MEMORY), backend, HostsDeny(str(tmp_path / "hosts.deny")), BanPolicy(),
                      lambda line: None)
    daemon, _said = bare_daemon(tmp_path, bans=bans)
    return daemon


def test_a_start_whose_capture_cannot_open_leaves_the_last_run_s_table_and_its_bans(tmp_path: Path) -> None:
    # The old table was deleted before the sensors opened; the start then failed before this
    # run's restore, and no ban was in the kernel until the next good start.
    rec = _kernel("psold", "psnew")
    daemon = _daemon(tmp_path, rec)
    daemon.sensors = [Unopenable()]
    try:
        with pytest.raises(CaptureError):
            daemon.open()
    finally:
        daemon.shutdown()
    assert ["nft", "delete", "table", "inet", "psold"] not in rec.argvs
    # Its capture chain is gone all the same: it logged to this run's NFLOG group.
    assert any(stdin is not None and "delete chain inet psold capture" in stdin for _argv, stdin in rec.calls)
    # Remembered still: the next start retires it.
    assert (tmp_path / "nft-table").read_text() == f"psold {GONE}\n"


def test_a_start_that_opens_retires_the_last_run_s_table_after_its_restore(tmp_path: Path) -> None:
    rec = _kernel("psold", "psnew")
    daemon = _daemon(tmp_path, rec)
    try:
        daemon.open()
    finally:
        daemon.shutdown()
    assert ["nft", "delete", "table", "inet", "psold"] in rec.argvs
    assert (tmp_path / "nft-table").read_text().split()[0] == "psnew"
