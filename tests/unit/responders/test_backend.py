"""Tests for the ban backend interface: the argv runner, address/timeout checks, auto-pick order.
Also home of `Recorder`, the fake runner the per-backend golden tests use."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest

from portsentry.responders.backend import (
    BackendError,
    RunResult,
    address_text,
    check_timeout,
    pick_backend,
    run_argv,
)
from portsentry.responders.iproute import RouteBackend
from portsentry.responders.ipset import IpsetBackend
from portsentry.responders.nftables import NftablesBackend

Answer = RunResult | Callable[[Sequence[str], str | None], RunResult]


class Recorder:
    """A runner that records (argv, stdin) and answers from `answers`: the first key that is a
    prefix of argv wins; anything unmatched succeeds with no output."""

    def __init__(self, answers: dict[tuple[str, ...], Answer] | None = None) -> None:
        self.calls: list[tuple[list[str], str | None]] = []
        self.answers = dict(answers or {})

    def __call__(self, argv: Sequence[str], stdin: str | None = None) -> RunResult:
        self.calls.append((list(argv), stdin))
        for prefix, answer in self.answers.items():
            if tuple(argv[: len(prefix)]) == prefix:
                return answer(argv, stdin) if callable(answer) else answer
        return RunResult(0, "", "")

    @property
    def argvs(self) -> list[list[str]]:
        return [argv for argv, _ in self.calls]


OK = RunResult(0, "", "")


def test_run_argv_runs_without_a_shell_and_reports_exit_status() -> None:
    result = run_argv([sys.executable, "-c", "import sys; print(sys.stdin.read()[::-1]); sys.exit(3)"],
                      "abc")
    assert result == RunResult(3, "cba\n", "")
    assert not result.ok
    # A shell would expand this; without one it is a literal argument.
    assert run_argv([sys.executable, "-c", "import sys; print(sys.argv[1])", "$HOME;x"]).stdout == \
        "$HOME;x\n"


def test_run_argv_keeps_the_tool_out_of_the_terminal_s_ctrl_c() -> None:
    # A terminal's Ctrl-C goes to its whole foreground process group: run in the daemon's, an
    # `nft -f` under way died with it ("cannot update the kernel's guarded sources: nft -f - ...
    # exited -2") while the daemon, which stops at its own pace, went on to say it was listening.
    # KILL_* commands already start in a session of their own (responders.shell).
    result = run_argv([sys.executable, "-c", "import os; print(os.getpgrp())"])
    assert result.ok, result
    assert int(result.stdout) != os.getpgrp()


def test_run_argv_missing_program_is_127() -> None:
    result = run_argv(["/nonexistent/portsentry-no-such-program"])
    assert result.returncode == 127
    assert "not found" in result.stderr


def test_address_text_accepts_only_address_objects() -> None:
    assert address_text(IPv4Address("198.18.0.1")) == "198.18.0.1"
    assert address_text(IPv6Address("fd00:0::0:1")) == "fd00::1"
    for bad in ("198.18.0.1", "198.18.0.1; nft flush ruleset", b"\xc6\x12\x00\x01", 3323068417, None):
        with pytest.raises(TypeError):
            address_text(bad)


@pytest.mark.parametrize("bad", [0, -1, 0.0, float("nan"), float("inf")])
def test_check_timeout_refuses_nonsense(bad: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        check_timeout(bad)


def test_check_timeout_passes_positive_and_none() -> None:
    assert check_timeout(None) is None
    assert check_timeout(3600) == 3600.0
    assert check_timeout(0.25) == 0.25


def _unsupported(program: str) -> Callable[[Sequence[str], str | None], RunResult]:
    def answer(argv: Sequence[str], stdin: str | None) -> RunResult:
        return RunResult(127, "", f"{program}: command not found")
    return answer


def test_auto_pick_prefers_nftables() -> None:
    rec = Recorder()
    backend = pick_backend(None, rec, socket_factory=lambda: _closing_socket())
    assert isinstance(backend, NftablesBackend)
    assert rec.argvs == [["nft", "list", "tables"]]


def test_auto_pick_falls_back_to_ipset_then_route() -> None:
    rec = Recorder({("nft",): _unsupported("nft")})
    assert isinstance(pick_backend("auto", rec), IpsetBackend)
    rec = Recorder({("nft",): _unsupported("nft"), ("ipset",): _unsupported("ipset")})
    backend = pick_backend(None, rec, kind="prohibit", table="other")
    assert isinstance(backend, RouteBackend)
    assert backend.kind == "prohibit"
    rec = Recorder({("nft",): _unsupported("nft"), ("ipset",): _unsupported("ipset"),
                    ("ip",): _unsupported("ip")})
    assert pick_backend(None, rec) is None


def test_pick_named_backend_only_tries_that_one() -> None:
    rec = Recorder({("ipset",): _unsupported("ipset")})
    assert pick_backend("ipset", rec) is None
    assert all(argv[0] in ("ipset", "iptables", "ip6tables") for argv in rec.argvs)
    assert isinstance(pick_backend("route", Recorder()), RouteBackend)


def test_pick_refuses_unknown_names_and_options() -> None:
    with pytest.raises(ValueError, match="unknown ban backend 'pf'"):
        pick_backend("pf", Recorder())
    with pytest.raises(ValueError, match="tabel"):
        pick_backend(None, Recorder(), tabel="x")


def test_default_add_many_loops_over_add() -> None:
    rec = Recorder()
    backend = RouteBackend(runner=rec)
    # RouteBackend batches; the base class's loop is what the abstract default does.
    from portsentry.responders.backend import BanBackend
    BanBackend.add_many(backend, [(ip_address("198.18.0.1"), 5.0), (ip_address("fd00::1"), None)])
    assert rec.argvs == [
        ["ip", "-4", "route", "add", "blackhole", "198.18.0.1", "proto", "213"],
        ["ip", "-6", "route", "add", "blackhole", "fd00::1", "proto", "213"],
    ]


def test_run_raises_backend_error_naming_the_command() -> None:
    rec = Recorder({("ip",): RunResult(2, "", "RTNETLINK answers: Operation not permitted\n")})
    with pytest.raises(BackendError, match=r"ip -4 route add .* exited 2: RTNETLINK answers"):
        RouteBackend(runner=rec).add(ip_address("198.18.0.1"), None)


def _closing_socket() -> socket.socket:
    return socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
