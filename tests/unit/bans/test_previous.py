"""The nftables table the last run used, removed at a start that uses another (bans.previous)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from portsentry.bans.previous import retire_previous_table
from portsentry.responders.backend import RunResult
from portsentry.responders.nftables import NftablesBackend
from tests.unit.responders.test_backend import Recorder


def kernel_with(*tables: str) -> Recorder:
    listing = json.dumps({"nftables": [{"table": {"family": "inet", "name": name}} for name in tables]})
    return Recorder({("nft", "-j", "list", "tables"): RunResult(0, listing, "")})


def maker(rec: Recorder) -> Callable[[str], NftablesBackend]:
    return lambda name: NftablesBackend(table=name, runner=rec, mechanism="cli")


def test_a_start_with_another_nft_table_removes_the_last_run_s_and_remembers_its_own(tmp_path) -> None:
    path, lines = str(tmp_path / "nft-table"), list[str]()
    rec = kernel_with("psold", "psnew")
    make = maker(rec)
    # A first start: nothing to remove; its table remembered.
    assert retire_previous_table(make("psold"), path, lines.append, make) is None
    assert Path(path).read_text() == f"psold {os.getpid()}\n" and rec.argvs == []
    # The same table again: left alone.
    assert retire_previous_table(make("psold"), path, lines.append, make) is None and rec.argvs == []
    assert retire_previous_table(make("psnew"), path, lines.append, make) == "psold"
    assert ["nft", "delete", "table", "inet", "psold"] in rec.argvs
    assert lines == ["adminalert: removed the nftables table inet psold that the last run kept its bans in "
                     "(NFT_TABLE is now psnew); the ban store's bans are restored into this run's"]
    assert Path(path).read_text().split()[0] == "psnew"
    # Without nftables now: its table goes too, and nothing is remembered.
    rec.calls.clear()
    assert retire_previous_table(None, path, lines.append, make) == "psnew"
    assert ["nft", "delete", "table", "inet", "psnew"] in rec.argvs and not os.path.exists(path)
    assert "(BAN_BACKEND is not nftables now)" in lines[-1]


def test_a_table_another_running_daemon_uses_or_one_already_gone_is_left(tmp_path) -> None:
    path, lines = str(tmp_path / "nft-table"), list[str]()
    rec = kernel_with("psnew")
    make = maker(rec)
    # Another daemon, still running with its table, wrote the file (its command line names us).
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "portsentry"])
    try:
        # Until its exec, the child's command line is this test's own.
        deadline = time.monotonic() + 10
        while b"portsentry" not in Path(f"/proc/{other.pid}/cmdline").read_bytes():
            assert time.monotonic() < deadline, "the stand-in daemon did not start"
            time.sleep(0.005)
        with open(path, "w") as handle:
            handle.write(f"psother {other.pid}\n")
        assert retire_previous_table(make("psnew"), path, lines.append, make) is None
        assert rec.argvs == [] and lines == []
    finally:
        other.kill()
        other.wait()
    # Gone from the kernel already (`portsentry flush`): nothing to remove, nothing said.
    with open(path, "w") as handle:
        handle.write(f"psgone {other.pid}\n")
    assert retire_previous_table(make("psnew"), path, lines.append, make) is None and lines == []


def test_a_removal_that_fails_is_said_and_tried_again_at_the_next_start(tmp_path) -> None:
    path, lines = str(tmp_path / "nft-table"), list[str]()

    def refuse(argv: Sequence[str], stdin: str | None) -> RunResult:
        return RunResult(1, "", "Error: Operation not permitted")

    rec = kernel_with("psold")
    rec.answers[("nft", "delete")] = refuse
    make = maker(rec)
    with open(path, "w") as handle:
        handle.write("psold 1\n")
    assert retire_previous_table(make("psnew"), path, lines.append, make) is None
    assert "cannot remove the nftables table inet psold" in lines[0]
    assert "nft delete table inet psold" in lines[0]
    assert Path(path).read_text() == "psold 1\n"
