"""Every branch of the decision engine, driven by plain probes and explicit times."""

from __future__ import annotations

from ipaddress import ip_address

import pytest

from portsentry.core.actions import Block, Decision, Log, Record, SendBanner, Step, StepKind
from portsentry.core.engine import Engine, EngineSettings, TriggerRing
from portsentry.core.probe import KIND_CONNECT, KIND_SYN, KIND_UDP, Mode, Probe

SCANNER = ip_address("198.18.0.2")
OTHER = ip_address("198.18.1.2")
ROUTE = "/sbin/ip route add blackhole $TARGET$"
DENY = "ALL: $TARGET$"
RUN = "/usr/local/bin/notify $TARGET$ $PORT$ $MODE$"


def probe(source=SCANNER, port=1, mode=Mode.TCP, kind=KIND_CONNECT, **extra) -> Probe:
    return Probe(source=source, port=port, mode=mode, kind=kind, **extra)


def engine(ignore=(), **settings) -> Engine:
    return Engine(EngineSettings(**settings), set(ignore))


def texts(actions) -> list[str]:
    return [a.text for a in actions if isinstance(a, Log)]


def test_ignored_host_gets_only_a_verbose_line_and_never_counts():
    e = engine(ignore=[SCANNER], block_tcp=1, kill_route=ROUTE, scan_trigger=2)
    actions = e.observe(probe(), 10.0).actions
    assert actions == [Log(f"attackalert: Host: {SCANNER} found in ignore file, aborting actions",
                           verbose=True)]
    # Removing it from the ignore list: its earlier hit was not counted, so trigger 2 waits again.
    e.ignore = set()
    assert all(isinstance(a, Log) and a.verbose for a in e.observe(probe(), 11.0).actions)


@pytest.mark.parametrize("trigger,fires_on", [(0, 1), (1, 1), (2, 2), (3, 3)])
def test_scan_trigger_fires_on_the_nth_hit_then_every_hit(trigger, fires_on):
    e = engine(scan_trigger=trigger, block_tcp=0)
    fired = []
    for n in range(1, 6):
        actions = e.observe(probe(port=n), float(n)).actions
        fired.append(any(isinstance(a, Log) and not a.verbose for a in actions))
    assert fired == [n >= fires_on for n in range(1, 6)]


def test_scan_trigger_counts_sources_separately_and_repeats_to_one_port():
    e = engine(scan_trigger=2, block_tcp=0)
    assert texts(e.observe(probe(port=1), 1.0).actions)[0].endswith("not acting yet")
    assert texts(e.observe(probe(source=OTHER, port=1), 2.0).actions)[0].endswith("not acting yet")
    # Same port again still counts (1.2 counts hits, not distinct ports).
    assert "Connect from host" in texts(e.observe(probe(port=1), 3.0).actions)[0]


def test_trigger_ring_forgets_hits_older_than_its_capacity():
    ring = TriggerRing(capacity=3)
    assert ring.hit(SCANNER) == 1
    for _ in range(3):
        ring.hit(OTHER)
    assert ring.hit(SCANNER) == 1  # the first hit fell out of the ring
    assert ring.hit(SCANNER) == 2


def test_large_trigger_is_honoured_unlike_1_2s_50_slot_ring():
    e = engine(scan_trigger=60, block_tcp=0)
    fired_at = next(n for n in range(1, 100)
                    if any("Connect from" in t for t in texts(e.observe(probe(), float(n)).actions)))
    assert fired_at == 60


def test_block_0_logs_ignoring_response_and_records_the_host():
    e = engine(block_tcp=0, kill_route=ROUTE)
    p = probe()
    actions = e.observe(p, 5.0).actions
    assert actions == [
        Log("attackalert: Connect from host: 198.18.0.2/198.18.0.2 to TCP port: 1"),
        Log("attackalert: Ignoring TCP response per configuration file setting."),
        Record(p, 5.0, blocked=False),
    ]
    last = texts(e.observe(p, 6.0).actions)[-1]
    assert last == "attackalert: Host: 198.18.0.2 is already blocked. Ignoring"


def test_block_1_orders_hosts_deny_then_route_then_command():
    e = engine(block_tcp=1, kill_route=ROUTE, kill_hosts_deny=DENY, kill_run_cmd=RUN)
    p = probe()
    block = e.observe(p, 1.0).actions[-1]
    assert block == Block(p, (Step(StepKind.HOSTS_DENY, DENY), Step(StepKind.ROUTE, ROUTE),
                              Step(StepKind.RUN_CMD, RUN)))


def test_kill_run_cmd_first_runs_the_command_before_blocking():
    e = engine(block_tcp=1, kill_route=ROUTE, kill_hosts_deny=DENY, kill_run_cmd=RUN,
               kill_run_cmd_first=True)
    block = e.observe(probe(), 1.0).actions[-1]
    assert isinstance(block, Block)
    assert [s.kind for s in block.steps] == [StepKind.RUN_CMD, StepKind.HOSTS_DENY, StepKind.ROUTE]


def test_block_2_runs_only_the_command():
    e = engine(block_udp=2, kill_route=ROUTE, kill_hosts_deny=DENY, kill_run_cmd=RUN)
    block = e.observe(probe(mode=Mode.UDP), 1.0).actions[-1]
    assert isinstance(block, Block)
    assert block.steps == (Step(StepKind.RUN_CMD, RUN),)


def test_block_2_without_a_command_just_records():
    e = engine(block_tcp=2)
    p = probe()
    assert e.observe(p, 1.0).actions[-1] == Record(p, 1.0, blocked=False)


def test_block_1_without_any_step_records_like_1_2():
    e = engine(block_tcp=1)
    p = probe()
    assert e.observe(p, 1.0).actions[-1] == Record(p, 1.0, blocked=False)


def test_block_levels_are_per_protocol():
    e = engine(block_tcp=0, block_udp=1, kill_route=ROUTE)
    assert isinstance(e.observe(probe(mode=Mode.UDP, kind=KIND_CONNECT), 1.0).actions[-1], Block)
    assert isinstance(e.observe(probe(source=OTHER), 1.0).actions[-1], Record)


def test_hits_during_a_block_wait_for_its_outcome_then_say_already_blocked():
    e = engine(block_tcp=1, kill_route=ROUTE)
    block = e.observe(probe(), 1.0).actions[-1]
    assert isinstance(block, Block)
    assert e.observe(probe(port=2), 1.1).actions == []  # held back while the block runs
    actions = e.finished(block, True, 1.2)
    assert actions[0] == Record(probe(), 1.2)
    assert texts(actions) == [
        "attackalert: Connect from host: 198.18.0.2/198.18.0.2 to TCP port: 2",
        "attackalert: Host: 198.18.0.2 is already blocked. Ignoring",
    ]


def test_hits_beyond_what_a_pending_block_keeps_are_said_in_one_line():
    """A flood during a slow KILL_ROUTE: the first PENDING_CAPACITY hits are logged one by one
    once the block is done, the rest are counted in a line instead of vanishing."""
    from portsentry.core.engine import PENDING_CAPACITY

    e = engine(block_tcp=1, kill_route=ROUTE)
    block = e.observe(probe(), 1.0).actions[-1]
    assert isinstance(block, Block)
    for n in range(PENDING_CAPACITY + 5):
        assert e.observe(probe(port=100 + n), 1.1).decision is Decision.ALREADY_BLOCKED
    lines = texts(e.finished(block, True, 1.2))
    assert len(lines) == 2 * PENDING_CAPACITY + 1
    assert lines[-1] == ("attackalert: Host: 198.18.0.2/198.18.0.2 is already blocked: 5 more TCP hits while "
                         f"its block was under way not logged (last to port {100 + PENDING_CAPACITY + 4})")
    assert e.state_sizes()["pending_blocks"] == 0


def test_hits_during_a_failed_block_try_again_in_order():
    e = engine(block_tcp=1, kill_route=ROUTE)
    block = e.observe(probe(), 1.0).actions[-1]
    assert isinstance(block, Block)
    e.observe(probe(port=2), 1.1)
    actions = e.finished(block, False, 1.2)
    assert texts(actions)[0] == "attackalert: ERROR: Could not block host 198.18.0.2 !!"
    assert isinstance(actions[-1], Block) and actions[-1].probe.port == 2


def test_successful_block_is_recorded_and_failed_block_is_retried():
    e = engine(block_tcp=1, kill_route=ROUTE)
    p = probe()
    block = e.observe(p, 1.0).actions[-1]
    assert isinstance(block, Block)
    assert e.finished(block, False, 2.0) == [
        Log("attackalert: ERROR: Could not block host 198.18.0.2 !!")]
    assert not e.is_blocked(Mode.TCP, SCANNER)
    block = e.observe(p, 3.0).actions[-1]
    assert isinstance(block, Block)
    assert e.finished(block, True, 4.0) == [Record(p, 4.0)]
    assert e.is_blocked(Mode.TCP, SCANNER)


def test_blocked_state_is_per_mode_like_1_2s_blocked_files():
    # A host only logged (BLOCK_TCP=0) is "already blocked" for -tcp alone; -udp still blocks it.
    e = engine(block_tcp=0, block_udp=1, kill_route=ROUTE)
    e.observe(probe(), 1.0)
    assert texts(e.observe(probe(port=2), 1.0).actions)[-1].endswith("is already blocked. Ignoring")
    assert isinstance(e.observe(probe(mode=Mode.UDP), 1.0).actions[-1], Block)


def test_banner_is_sent_in_connect_modes_only_when_the_trigger_fires():
    e = engine(port_banner="go away", scan_trigger=2)
    assert not any(isinstance(a, SendBanner) for a in e.observe(probe(), 1.0).actions)
    assert e.observe(probe(), 2.0).actions[0] == SendBanner("go away")
    stealth = engine(port_banner="go away")
    assert not any(isinstance(a, SendBanner)
                   for a in stealth.observe(probe(mode=Mode.STCP, kind=KIND_SYN), 1.0).actions)


def test_stealth_detection_lines_and_ip_options():
    e = engine(block_tcp=0, block_udp=0)
    tcp = e.observe(probe(mode=Mode.STCP, kind=KIND_SYN, port=111, ip_options=True), 1.0).actions
    assert texts(tcp)[:2] == [
        "attackalert: TCP SYN/Normal scan from host: 198.18.0.2/198.18.0.2 to TCP port: 111",
        "attackalert: Packet from host: 198.18.0.2/198.18.0.2 to TCP port: 111 has IP options "
        "set (detection avoidance technique).",
    ]
    udp = e.observe(probe(mode=Mode.SUDP, kind=KIND_UDP, port=161), 1.0).actions
    assert texts(udp)[0] == "attackalert: UDP scan from host: 198.18.0.2/198.18.0.2 to UDP port: 161"
    again = e.observe(probe(mode=Mode.STCP, kind=KIND_SYN, port=112), 2.0).actions
    assert texts(again)[-1] == "attackalert: Host: 198.18.0.2/198.18.0.2 is already blocked Ignoring"


def test_resolved_name_appears_before_the_address():
    e = engine(block_tcp=0)
    actions = e.observe(probe(source_name="scanner.example"), 1.0).actions
    assert texts(actions)[0] == (
        "attackalert: Connect from host: scanner.example/198.18.0.2 to TCP port: 1")


def test_ipv6_sources_are_handled_like_ipv4():
    source = ip_address("fd00::2")
    e = engine(block_tcp=1, kill_hosts_deny=DENY)
    actions = e.observe(probe(source=source), 1.0).actions
    assert texts(actions)[0] == "attackalert: Connect from host: fd00::2/fd00::2 to TCP port: 1"
    assert isinstance(actions[-1], Block)



def test_the_change_feed_marks_bans_made_and_lifted_elsewhere():
    # issue 10.1: the engine hears ban-made / ban-lifted instead of re-reading every ban.
    from ipaddress import ip_address

    from portsentry.core.actions import Block
    from portsentry.core.engine import Engine, EngineSettings
    from portsentry.core.probe import KIND_SYN, Mode, Probe

    engine = Engine(EngineSettings(block_tcp=1, kill_route="true $TARGET$"), set())
    source = ip_address("198.18.0.9")
    probe = Probe(source, 1, Mode.STCP, KIND_SYN)
    engine.apply_ban_changes([(source, True)])  # `portsentry block` from the CLI
    assert engine.is_blocked(Mode.STCP, source)
    assert not any(isinstance(a, Block) for a in engine.observe(probe, 1.0).actions)
    engine.apply_ban_changes([(source, False), (source, True), (source, False)])  # in feed order
    assert not engine.is_blocked(Mode.STCP, source)
    assert any(isinstance(a, Block) for a in engine.observe(probe, 2.0).actions)


def test_restored_bans_count_as_blocked_in_every_mode_and_a_resync_frees_them():
    e = engine(block_tcp=1, kill_hosts_deny="ALL: $TARGET$")
    v6 = ip_address("fd00::2")
    e.sync_bans([SCANNER.packed, v6.packed])  # what restore hands over: packed addresses
    for mode in (Mode.TCP, Mode.STCP, Mode.ATCP):
        assert e.observe(probe(mode=mode), 1.0).decision == "already_blocked"
    assert e.observe(probe(source=v6), 1.0).decision == "already_blocked"
    e.sync_bans([v6.packed])  # SCANNER's ban was lifted while the feed could not be followed
    assert e.observe(probe(), 2.0).decision == "block"
    e.apply_ban_changes([(v6, False)])
    assert e.observe(probe(source=v6), 3.0).decision == "block"


@pytest.mark.parametrize("block_udp", [0, 1])
def test_a_udp_banner_goes_once_per_source_not_to_every_later_datagram(block_udp):
    # A datagram forged "from" a UDP echo (or chargen) service: our banner reaches that service,
    # which answers to our port, which answered again with 1.2's banner-per-hit: one forged
    # datagram set off an endless exchange. Hosts.deny does not stop UDP, BLOCK_UDP=0 nothing.
    e = engine(port_banner="go away", block_udp=block_udp, kill_hosts_deny=DENY)
    first = e.observe(probe(mode=Mode.UDP, kind=KIND_CONNECT, port=7), 1.0)
    assert first.actions[0] == SendBanner("go away")
    if block_udp:
        block = first.actions[-1]
        assert isinstance(block, Block)
        # The echo's answer while the block is under way, and after it.
        assert not [a for a in e.observe(probe(mode=Mode.UDP, port=7), 1.1).actions
                    if isinstance(a, SendBanner)]
        e.finished(block, True, 1.2)
    for at in (2.0, 3.0):
        later = e.observe(probe(mode=Mode.UDP, kind=KIND_CONNECT, port=7), at).actions
        assert not [a for a in later if isinstance(a, SendBanner)]
        assert texts(later)[-1] == f"attackalert: Host: {SCANNER} is already blocked. Ignoring"
    # TCP needs a handshake, so no loop: its banner still goes to every connection, as in 1.2.
    e.observe(probe(), 4.0)
    assert e.observe(probe(), 5.0).actions[0] == SendBanner("go away")


def test_a_host_being_blocked_is_not_blocked_again_by_another_mode_meanwhile():
    # -tcp and -atcp in one daemon (the shipped unit runs both): a connect to port 1 starts the
    # block; the scanner's SYN to port 2 (-atcp) came before it was done and started a second
    # one: KILL_ROUTE ran twice (two iptables rules, one left after the undo) and the ban was
    # recorded twice. After the block is done the other mode already says "already blocked".
    e = engine(block_tcp=1, kill_route=ROUTE)
    first = e.observe(probe(port=1), 1.0).actions[-1]
    assert isinstance(first, Block)
    meanwhile = e.observe(probe(mode=Mode.ATCP, kind=KIND_SYN, port=2), 1.1)
    assert not [a for a in meanwhile.actions if isinstance(a, Block)]
    assert meanwhile.decision is Decision.ALREADY_BLOCKED
    after = e.finished(first, True, 1.2)
    assert texts(after) == [
        "attackalert: TCP SYN/Normal scan from host: 198.18.0.2/198.18.0.2 to TCP port: 2",
        "attackalert: Host: 198.18.0.2/198.18.0.2 is already blocked Ignoring",
    ]
    assert not [a for a in after if isinstance(a, Block)]


def test_after_a_failed_block_the_hits_that_waited_start_one_new_block_not_one_per_mode():
    e = engine(block_tcp=1, kill_route=ROUTE)
    first = e.observe(probe(port=1), 1.0).actions[-1]
    assert isinstance(first, Block)
    e.observe(probe(mode=Mode.ATCP, kind=KIND_SYN, port=2), 1.1)
    e.observe(probe(mode=Mode.STCP, kind=KIND_SYN, port=3), 1.2)
    after = e.finished(first, False, 1.3)
    retries = [a for a in after if isinstance(a, Block)]
    assert [b.probe.port for b in retries] == [2]
    # The -stcp hit is decided once the retry is done.
    assert texts(e.finished(retries[0], True, 1.4))[-1] == (
        "attackalert: Host: 198.18.0.2/198.18.0.2 is already blocked Ignoring")


def test_block_2_runs_the_command_but_bans_nobody_so_another_mode_still_blocks():
    # BLOCK_TCP=2 (notify only) and BLOCK_UDP=1: the ban store records no ban for a command-only
    # block, but the engine took it for one and -udp said "already blocked" instead of blocking.
    e = engine(block_tcp=2, block_udp=1, kill_run_cmd=RUN, kill_route=ROUTE)
    notify = e.observe(probe(), 1.0).actions[-1]
    assert isinstance(notify, Block) and [s.kind for s in notify.steps] == [StepKind.RUN_CMD]
    e.finished(notify, True, 1.1)
    assert texts(e.observe(probe(port=2), 2.0).actions)[-1].endswith("is already blocked. Ignoring")
    udp = e.observe(probe(mode=Mode.UDP), 3.0).actions[-1]
    assert isinstance(udp, Block) and StepKind.ROUTE in [s.kind for s in udp.steps]


@pytest.mark.parametrize("lifted", ["feed", "resync"])
def test_a_lift_heard_before_the_blocks_outcome_leaves_the_host_free(lifted):
    # The ban's record, then an admin's unblock (waiting for the address's turn), reached the
    # engine from the maintenance round before the responder's outcome did: "finished" then
    # marked the host banned again, and its next scans said "already blocked" with no ban
    # anywhere, until a restart.
    e = engine(block_tcp=1, kill_route=ROUTE)
    block = e.observe(probe(), 1.0).actions[-1]
    assert isinstance(block, Block)
    assert e.observe(probe(port=2), 1.1).decision is Decision.ALREADY_BLOCKED  # held back
    if lifted == "feed":
        e.apply_ban_changes([(SCANNER, True), (SCANNER, False)])
    else:
        e.sync_bans([OTHER.packed])  # the feed could not be followed: every ban in force
    after = e.finished(block, True, 1.3)
    # The hit that waited came before the unblock: it was made while the host was blocked.
    assert after[0] == Record(probe(), 1.3)
    assert texts(after)[-1] == f"attackalert: Host: {SCANNER} is already blocked. Ignoring"
    assert not e.is_blocked(Mode.TCP, SCANNER) and not e.is_blocked(Mode.STCP, SCANNER)
    assert e.observe(probe(port=3), 2.0).decision is Decision.BLOCK


def test_a_ban_heard_after_a_lift_while_the_block_ran_keeps_the_host_banned():
    # The lift was of an earlier ban, and this block's record came after it: still banned.
    e = engine(block_tcp=1, kill_route=ROUTE)
    block = e.observe(probe(), 1.0).actions[-1]
    assert isinstance(block, Block)
    e.apply_ban_changes([(SCANNER, False), (SCANNER, True)])
    e.finished(block, True, 1.3)
    assert e.is_blocked(Mode.STCP, SCANNER)
    assert e.observe(probe(port=3), 2.0).decision is Decision.ALREADY_BLOCKED
