"""Golden tests for the ipset backend: the exact ipset/iptables argv and restore text it emits, and
how it reads `ipset save`; no root needed."""

from __future__ import annotations

import contextlib
import os
from ipaddress import ip_address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portsentry.responders.backend import BackendError, RunResult
from portsentry.responders.ipset import MAX_TIMEOUT, IpsetBackend, parse_save, seconds
from tests.unit.responders.test_backend import Recorder

FUZZ = settings(max_examples=int(os.environ.get("PORTSENTRY_FUZZ_EXAMPLES", "100")), deadline=None)
V4 = ip_address("198.18.0.9")
V6 = ip_address("fd00::9")
ABSENT = RunResult(1, "", "iptables: Bad rule (does a matching rule exist in that chain?).\n")
RULE4 = ["-m", "set", "--match-set", "portsentry4", "src", "-j", "DROP"]
RULE6 = ["-m", "set", "--match-set", "portsentry6", "src", "-j", "DROP"]
CREATE4 = ["ipset", "create", "portsentry4", "hash:ip", "family", "inet", "timeout", "0",
           "maxelem", "262144", "-exist"]
CREATE6 = ["ipset", "create", "portsentry6", "hash:ip", "family", "inet6", "timeout", "0",
           "maxelem", "262144", "-exist"]


def test_setup_creates_sets_and_inserts_rules_when_absent() -> None:
    rec = Recorder({("iptables", "-w", "-C"): ABSENT, ("ip6tables", "-w", "-C"): ABSENT})
    IpsetBackend(runner=rec).setup()
    assert rec.argvs == [
        CREATE4,
        ["iptables", "-w", "-C", "INPUT", *RULE4],
        ["iptables", "-w", "-I", "INPUT", *RULE4],
        CREATE6,
        ["ip6tables", "-w", "-C", "INPUT", *RULE6],
        ["ip6tables", "-w", "-I", "INPUT", *RULE6],
    ]


def test_setup_again_inserts_nothing() -> None:
    rec = Recorder()
    IpsetBackend(runner=rec).setup()
    assert not any("-I" in argv for argv in rec.argvs)


def test_setup_check_error_other_than_absent_is_raised() -> None:
    rec = Recorder({("iptables", "-w", "-C"): RunResult(4, "", "Another app holds the lock")})
    with pytest.raises(BackendError, match="exited 4: Another app"):
        IpsetBackend(runner=rec).setup()


def test_options_reach_the_commands() -> None:
    rec = Recorder({("iptables", "-w", "-C"): ABSENT, ("ip6tables", "-w", "-C"): ABSENT})
    IpsetBackend(set_prefix="ps", chain="PS_IN", maxelem=10, runner=rec).setup()
    assert rec.argvs[0] == ["ipset", "create", "ps4", "hash:ip", "family", "inet", "timeout", "0",
                            "maxelem", "10", "-exist"]
    assert rec.argvs[2] == ["iptables", "-w", "-I", "PS_IN", "-m", "set", "--match-set", "ps4",
                            "src", "-j", "DROP"]


def test_add_and_remove_golden() -> None:
    rec = Recorder()
    backend = IpsetBackend(runner=rec)
    backend.add(V4, 3600)
    backend.add(V6, None)
    backend.add(V4, 0.2)
    backend.remove(V4)
    backend.remove(V6)
    assert rec.calls == [
        (["ipset", "add", "portsentry4", "198.18.0.9", "timeout", "3600", "-exist"], None),
        (["ipset", "add", "portsentry6", "fd00::9", "timeout", "0", "-exist"], None),
        (["ipset", "add", "portsentry4", "198.18.0.9", "timeout", "1", "-exist"], None),
        (["ipset", "del", "portsentry4", "198.18.0.9", "-exist"], None),
        (["ipset", "del", "portsentry6", "fd00::9", "-exist"], None),
    ]


def test_add_many_is_one_restore() -> None:
    rec = Recorder()
    IpsetBackend(runner=rec).add_many([(V4, 60.5), (V6, None)])
    assert rec.calls == [(["ipset", "restore", "-exist"],
                          "add portsentry4 198.18.0.9 timeout 61\nadd portsentry6 fd00::9 timeout 0\n")]
    rec = Recorder()
    IpsetBackend(runner=rec).add_many([])
    assert rec.calls == []


def test_teardown_removes_rules_then_sets() -> None:
    checks = iter([RunResult(0, "", ""), RunResult(0, "", ""), ABSENT, ABSENT])
    rec = Recorder({
        ("ipset", "list", "-n"): RunResult(0, "other\nportsentry4\n", ""),
        ("iptables", "-w", "-C"): lambda argv, stdin: next(checks),
    })
    assert IpsetBackend(runner=rec).teardown() == "set portsentry4 and 2 iptables rules"
    assert rec.argvs == [
        ["ipset", "list", "-n"],
        ["iptables", "-w", "-C", "INPUT", *RULE4],
        ["iptables", "-w", "-D", "INPUT", *RULE4],
        ["iptables", "-w", "-C", "INPUT", *RULE4],
        ["iptables", "-w", "-D", "INPUT", *RULE4],
        ["iptables", "-w", "-C", "INPUT", *RULE4],
        ["ipset", "destroy", "portsentry4"],
    ]


def test_teardown_of_both_sets_names_each_with_its_rule() -> None:
    rec = Recorder({
        ("ipset", "list", "-n"): RunResult(0, "portsentry4\nportsentry6\n", ""),
        ("iptables", "-w", "-C"):
            lambda argv, stdin: ABSENT if rec.argvs.count(list(argv)) > 1 else RunResult(0, "", ""),
        ("ip6tables", "-w", "-C"): ABSENT,
    })
    assert (IpsetBackend(runner=rec).teardown()
            == "set portsentry4 and 1 iptables rule, set portsentry6")


def test_teardown_without_our_sets_removes_nothing_and_says_so() -> None:
    # `portsentry flush` said "removed ipset: sets ..." of sets that were not there.
    rec = Recorder({("ipset", "list", "-n"): RunResult(0, "other\n", "")})
    assert IpsetBackend(runner=rec).teardown() is None
    assert rec.argvs == [["ipset", "list", "-n"]]


def test_members_parses_save_output() -> None:
    save4 = ("create portsentry4 hash:ip family inet hashsize 1024 maxelem 262144 timeout 0\n"
             "add portsentry4 198.18.5.5 timeout 59\nadd portsentry4 198.18.5.6 timeout 0\n")
    save6 = "create portsentry6 hash:ip family inet6\nadd portsentry6 fd00::5 timeout 10\n"
    rec = Recorder({("ipset", "save", "portsentry4"): RunResult(0, save4, ""),
                    ("ipset", "save", "portsentry6"): RunResult(0, save6, "")})
    assert IpsetBackend(runner=rec).members() == {
        ip_address("198.18.5.5"): 59.0, ip_address("198.18.5.6"): None, ip_address("fd00::5"): 10.0,
    }


def test_parse_save_rejects_bad_lines() -> None:
    with pytest.raises(BackendError, match="not an address"):
        parse_save("add s4 nonsense timeout 1\n", "s4")
    with pytest.raises(BackendError, match="bad timeout"):
        parse_save("add s4 198.18.0.1 timeout\n", "s4")
    assert parse_save("add other 198.18.0.1 timeout 5\n", "s4") == {}


@FUZZ
@given(st.text(max_size=200))
def test_parse_save_fuzz_only_backend_errors(text: str) -> None:
    with contextlib.suppress(BackendError):
        parse_save(text, "s4")


@pytest.mark.parametrize(("value", "expected"), [
    (None, 0), (1, 1), (0.001, 1), (3600, 3600), (3600.2, 3601), (MAX_TIMEOUT, MAX_TIMEOUT),
    (MAX_TIMEOUT + 0.5, 0), (30 * 86400, 0), (10**9, 0),
])
def test_seconds(value: float | None, expected: int) -> None:
    assert seconds(value) == expected


def test_only_address_objects_reach_any_command() -> None:
    rec = Recorder()
    backend = IpsetBackend(runner=rec)
    for bad in ("198.18.0.9", "198.18.0.9 -exist\nflush", 1):
        with pytest.raises(TypeError):
            backend.add(bad, 60)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            backend.remove(bad)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            backend.add_many([(V4, 60), (bad, 60)])  # type: ignore[list-item]
    assert rec.calls == []


@pytest.mark.parametrize("kw", [{"set_prefix": "a b"}, {"set_prefix": "-x"}, {"chain": "IN PUT"},
                                {"maxelem": 0}])
def test_constructor_refuses_bad_options(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        IpsetBackend(**kw)  # type: ignore[arg-type]


def test_is_supported_needs_ipset_iptables_and_ip6tables() -> None:
    assert IpsetBackend(runner=Recorder()).is_supported()
    rec = Recorder({("ip6tables",): RunResult(127, "", "not found")})
    assert not IpsetBackend(runner=rec).is_supported()


def test_repair_puts_back_a_rule_iptables_restore_flushed_and_nothing_while_intact() -> None:
    sets = RunResult(0, "portsentry4\nportsentry6\n", "")
    present = {"v4": True}
    def check4(argv: object, stdin: object) -> RunResult:
        return RunResult(0, "", "") if present["v4"] else ABSENT

    rec = Recorder({("ipset", "list", "-n"): sets, ("iptables", "-w", "-C"): check4})
    backend = IpsetBackend(runner=rec)
    assert backend.repair_capture() is False and rec.calls == []  # not set up by us: nothing to watch
    backend.setup()
    rec.calls.clear()
    assert backend.repair_capture() is False
    assert not any("-I" in argv for argv in rec.argvs)
    present["v4"] = False  # netfilter-persistent reload
    assert backend.repair_capture() is True
    assert ["iptables", "-w", "-I", "INPUT", *RULE4] in rec.argvs
    backend.teardown()
    rec.calls.clear()
    assert backend.repair_capture() is False and rec.calls == []


def test_repair_makes_sets_destroyed_behind_our_back_again() -> None:
    rec = Recorder({("ipset", "list", "-n"): RunResult(0, "portsentry6\n", "")})
    backend = IpsetBackend(runner=rec)
    backend.setup()
    rec.calls.clear()
    assert backend.repair_capture() is True
    assert CREATE4 in rec.argvs
    # A missing set's rule is not asked about: `iptables -C` would fail on the set, not say absent.
    assert ["iptables", "-w", "-C", "INPUT", *RULE4] not in rec.argvs[:2]


def test_replace_all_fills_a_staging_set_and_swaps_it_in() -> None:
    # A plain add left members the store no longer knows in the set, for ever without a timeout.
    rec = Recorder()
    IpsetBackend(runner=rec).replace_all([(V4.packed, 60.0), (V6.packed, None)])
    assert rec.calls == [(["ipset", "restore", "-exist"], (
        "create portsentry4.new hash:ip family inet timeout 0 maxelem 262144\n"
        "flush portsentry4.new\n"
        "create portsentry6.new hash:ip family inet6 timeout 0 maxelem 262144\n"
        "flush portsentry6.new\n"
        "add portsentry4.new 198.18.0.9 timeout 60\n"
        "add portsentry6.new fd00::9 timeout 0\n"
        "swap portsentry4.new portsentry4\n"
        "destroy portsentry4.new\n"
        "swap portsentry6.new portsentry6\n"
        "destroy portsentry6.new\n"))]
    # A name at ipset's limit of 31 bytes still leaves room.
    longest = IpsetBackend(set_prefix="p" * 30, runner=Recorder())
    assert longest.staging_name(longest.set4) == "p" * 27 + ".new"


def test_holds_any_reads_the_counts_of_both_sets() -> None:
    def header(count: int) -> RunResult:
        return RunResult(0, f"Name: x\nType: hash:ip\nNumber of entries: {count}\nMembers:\n", "")

    empty = Recorder({("ipset", "list", "-t"): header(0)})
    assert not IpsetBackend(runner=empty).holds_any()
    assert empty.argvs == [["ipset", "list", "-t", "portsentry4"], ["ipset", "list", "-t", "portsentry6"]]
    assert IpsetBackend(runner=Recorder({("ipset", "list", "-t", "portsentry6"): header(3),
                                         ("ipset", "list", "-t"): header(0)})).holds_any()
    assert IpsetBackend(runner=Recorder({("ipset", "list", "-t"): RunResult(0, "odd\n", "")})).holds_any()
