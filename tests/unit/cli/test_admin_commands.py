"""The admin subcommands' answers to an admin: what they say they did is what they did, and a
refusal is one line on standard error with a non-zero exit, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from portsentry.bans.store import BanStore
from portsentry.cli.main import main
from portsentry.host import privileges
from portsentry.host.privileges import CAPABILITIES, CapabilitySets
from portsentry.responders.backend import BackendError
from tests.unit.cli.test_main import one_client, replying, status_reply

ALL_CAPS = (1 << (max(CAPABILITIES.values()) + 1)) - 1


class FakeBackend:
    """Stands in for the configured backend: records a teardown, or fails it as the kernel did."""

    name = "route"

    def __init__(self, error: str | None = None,
                 removed: str | None = "2 blackhole routes (proto 213)") -> None:
        self.error, self.removed = error, removed
        self.torn_down = 0

    def teardown(self) -> str | None:
        self.torn_down += 1
        if self.error is not None:
            raise BackendError(self.error)
        return self.removed

    def owned(self) -> str:
        return "blackhole routes with proto 213"


def _conf(tmp_path: Path, backend: str = "route") -> Path:
    conf = tmp_path / "ps.conf"
    conf.write_text(f'TCP_PORTS="1"\nBAN_BACKEND="{backend}"\nSTATE_DIR="{tmp_path}/state"\n'
                    f'CONTROL_SOCKET="{tmp_path}/ctl.sock"\n')
    return conf


def _capabilities(monkeypatch: pytest.MonkeyPatch, effective: int) -> None:
    monkeypatch.setattr(privileges, "read_status",
                        lambda path="": CapabilitySets(effective, effective, 0, effective))


@pytest.mark.parametrize("backend", ["route", "nftables", "auto"])
def test_flush_without_cap_net_admin_refuses_and_removes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    # As a user other than root `portsentry flush` printed "removed route: blackhole host
    # routes ..." and exited 0 with every route and the nftables table still there (auto, which
    # finds no nftables it may list, picked the routes), or ended in a traceback from 'ip route
    # flush': Operation not permitted, or said that nftables "does not work on this host".
    from portsentry.service import admin

    fake = FakeBackend()
    monkeypatch.setattr(admin, "open_backend", lambda config, setup=True: fake)
    _capabilities(monkeypatch, ALL_CAPS & ~(1 << CAPABILITIES["CAP_NET_ADMIN"]))
    assert main(["flush", "-c", str(_conf(tmp_path, backend))]) == 1
    out, err = capsys.readouterr()
    assert out == "" and fake.torn_down == 0
    assert err == ("portsentry: flush: only root (CAP_NET_ADMIN) may remove the ban backend's "
                   "table, sets or routes: nothing removed\n")


def test_a_flush_the_kernel_refuses_is_one_error_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from portsentry.service import admin

    fake = FakeBackend("ip -4 route flush proto 213 type blackhole exited 2: Operation not permitted")
    monkeypatch.setattr(admin, "open_backend", lambda config, setup=True: fake)
    _capabilities(monkeypatch, ALL_CAPS)
    assert main(["flush", "-c", str(_conf(tmp_path))]) == 1
    out, err = capsys.readouterr()
    assert out == "" and fake.torn_down == 1
    assert err == ("portsentry: flush: ip -4 route flush proto 213 type blackhole exited 2: "
                   "Operation not permitted\n")


def test_flush_with_cap_net_admin_removes_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from portsentry.service import admin

    fake = FakeBackend()
    monkeypatch.setattr(admin, "open_backend", lambda config, setup=True: fake)
    _capabilities(monkeypatch, 1 << CAPABILITIES["CAP_NET_ADMIN"])
    assert main(["flush", "-c", str(_conf(tmp_path))]) == 0
    assert capsys.readouterr().out == "removed route: 2 blackhole routes (proto 213)\n"
    assert fake.torn_down == 1


def test_flush_with_nothing_there_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A second flush, or one after NFT_TABLE changed, said "removed nftables: table inet ..." of
    # a table that was not there.
    from portsentry.service import admin

    fake = FakeBackend(removed=None)
    monkeypatch.setattr(admin, "open_backend", lambda config, setup=True: fake)
    _capabilities(monkeypatch, ALL_CAPS)
    assert main(["flush", "-c", str(_conf(tmp_path))]) == 0
    assert capsys.readouterr() == ("nothing to remove: no blackhole routes with proto 213 here\n", "")
    assert fake.torn_down == 1


def test_flush_while_the_daemon_runs_is_refused_as_it_would_be_undone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # `portsentry flush` with the daemon running said "removed nftables: table inet portsentry"
    # and exit 0; within a minute the daemon's repair put the table and every ban back, saying
    # "our firewall table was gone (ruleset flushed?)".
    from portsentry.service import admin

    fake = FakeBackend()
    monkeypatch.setattr(admin, "open_backend", lambda config, setup=True: fake)
    _capabilities(monkeypatch, ALL_CAPS)
    with one_client(str(tmp_path / "ctl.sock"), replying(status_reply(4242))):
        assert main(["flush", "-c", str(_conf(tmp_path))]) == 1
    out, err = capsys.readouterr()
    assert out == "" and fake.torn_down == 0
    assert err == ("portsentry: flush: the daemon is running (pid 4242) and would put it all back "
                   "within a minute: stop it first, then flush; nothing removed\n")


@pytest.mark.parametrize("json", [False, True])
def test_list_with_no_ban_store_yet_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], json: bool
) -> None:
    # `portsentry list` on a host where the daemon never ran (or before the first start) made
    # STATE_DIR and an empty ban store as a side effect of a command that only reads.
    from portsentry.service import admin

    assert main(["list", "-c", str(_conf(tmp_path))] + (["--json"] if json else [])) == 0
    assert capsys.readouterr().out == (admin.as_json([]) if json else admin.format_listing([])) + "\n"
    assert not (tmp_path / "state").exists()


def test_list_without_the_daemon_sets_up_no_backend(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # `portsentry list` with the daemon stopped set up the ban backend to read the store: after
    # `flush` (the way back to 1.2, or out), a look at what is banned put `table inet portsentry`
    # back in the kernel.
    from portsentry.service import admin

    setups: list[bool] = []

    def opened(config: object, setup: bool = True) -> None:
        setups.append(setup)

    monkeypatch.setattr(admin, "open_backend", opened)
    conf = _conf(tmp_path, "nftables")
    (tmp_path / "state").mkdir()
    BanStore(str(tmp_path / "state" / "bans.sqlite3")).close()  # a store to read: the daemon ran here
    assert main(["list", "-c", str(conf)]) == 0
    assert "no active bans" in capsys.readouterr().out
    assert True not in setups


def test_flush_refuses_when_a_daemon_takes_the_question_and_does_not_answer_in_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A daemon that did not answer within the time (stopped, or its loop busy with a long restore
    # at its start) was taken for none: flush said "removed nftables: table inet portsentry",
    # exit 0, and the daemon's repair put the table and every ban back within a minute.

    from portsentry.cli import main as cli_main
    from portsentry.service import admin

    fake = FakeBackend()
    monkeypatch.setattr(admin, "open_backend", lambda config, setup=True: fake)
    monkeypatch.setattr(cli_main, "FLUSH_ASK_TIMEOUT", 0.3)
    _capabilities(monkeypatch, ALL_CAPS)
    with one_client(str(tmp_path / "ctl.sock"), lambda _conn, done: done.wait(10)):
        assert main(["flush", "-c", str(_conf(tmp_path))]) == 1
    out, err = capsys.readouterr()
    assert out == "" and fake.torn_down == 0
    assert err == (f"portsentry: flush: a daemon at {tmp_path / 'ctl.sock'} took the question and did not "
                   "answer within 0.3 s: running, it would put it all back within a minute: stop it "
                   "first, then flush; nothing removed\n")


def test_flush_goes_on_when_the_daemon_hangs_up_unanswered_as_a_stopping_one_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:

    from portsentry.service import admin

    fake = FakeBackend()
    monkeypatch.setattr(admin, "open_backend", lambda config, setup=True: fake)
    _capabilities(monkeypatch, ALL_CAPS)
    with one_client(str(tmp_path / "ctl.sock"), replying(b"")):
        assert main(["flush", "-c", str(_conf(tmp_path))]) == 0
    assert fake.torn_down == 1
