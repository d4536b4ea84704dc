"""Spoofing guards: protected addresses, ban rate caps, TCP evidence for sensitive networks."""

from __future__ import annotations

from ipaddress import ip_address, ip_network

from portsentry.core.actions import Block, Log
from portsentry.core.engine import Engine, EngineSettings
from portsentry.core.guard import BanGuard, BoundedSet, GuardSettings
from portsentry.core.probe import KIND_CONNECT, KIND_SYN, Mode, Probe

GATEWAY = ip_address("198.18.0.254")
ROUTE = "ip route add blackhole $TARGET$"


def syn(source, port=1, mode=Mode.STCP) -> Probe:
    return Probe(source=ip_address(source) if isinstance(source, str) else source, port=port, mode=mode,
                 kind=KIND_SYN if mode is not Mode.TCP else KIND_CONNECT)


def engine(**guard) -> Engine:
    e = Engine(EngineSettings(block_tcp=1, kill_route=ROUTE, guard=GuardSettings(**guard)), set())
    e.guard.set_protected({GATEWAY})
    return e


def texts(actions) -> list[str]:
    return [a.text for a in actions if isinstance(a, Log)]


def test_forged_hits_from_the_gateway_never_block_and_are_logged_once_per_window():
    e = engine()
    first = e.observe(syn(GATEWAY), 1.0).actions
    assert not any(isinstance(a, Block) for a in first)
    assert texts(first)[-1] == ("attackalert: Host: 198.18.0.254/198.18.0.254 is not blocked: it is a "
                                "default gateway or DNS resolver of this host (spoofing guard)")
    for n in range(100):
        assert texts(e.observe(syn(GATEWAY, port=n), 2.0 + n).actions) == []
    assert e.guard.refused_total == 101
    assert texts(e.observe(syn(GATEWAY), 4000.0).actions)  # a new window logs once more


def test_global_ban_rate_cap_counts_the_excess_and_summarises():
    e = engine(ban_rate_limit=10)
    blocks = 0
    for n in range(100):
        source = ip_address("198.18.0.0") + 1000 + n
        blocks += sum(isinstance(a, Block) for a in e.observe(syn(source), 5.0 + n * 0.01).actions)
    assert blocks == 10
    assert e.guard.rate_limited_total == 90
    summary = texts(e.tick(70.0))
    assert summary == ["attackalert: ban rate limit: 90 hits in the last minute were not acted on"]
    # A minute later bans are allowed again.
    assert any(isinstance(a, Block) for a in e.observe(syn("198.18.9.9"), 70.0).actions)


def test_per_network_cap():
    e = engine(ban_rate_limit=0, ban_rate_limit_net=2)
    results = [any(isinstance(a, Block) for a in e.observe(syn(f"198.18.7.{n}"), 1.0).actions)
               for n in range(1, 6)]
    assert results == [True, True, False, False, False]
    assert any(isinstance(a, Block) for a in e.observe(syn("198.18.8.1"), 1.0).actions)


def test_sensitive_network_needs_a_completed_tcp_connection_first():
    e = engine(sensitive_networks=(ip_network("198.18.4.0/24"),))
    stealth = e.observe(syn("198.18.4.7"), 1.0).actions
    assert not any(isinstance(a, Block) for a in stealth)
    assert "without a completed TCP connection" in texts(stealth)[-1]
    connect = e.observe(syn("198.18.4.7", mode=Mode.TCP), 2.0).actions[-1]  # a real handshake
    assert isinstance(connect, Block)
    e.finished(connect, False, 2.5)  # that block failed: the next hit, a stealth one, may block
    assert any(isinstance(a, Block) for a in e.observe(syn("198.18.4.7", port=2), 3.0).actions)
    # Outside the sensitive network a stealth hit blocks at once.
    assert any(isinstance(a, Block) for a in e.observe(syn("198.18.5.7"), 4.0).actions)


def test_guard_tables_stay_bounded_under_a_flood_of_sources():
    guard = BanGuard(GuardSettings(ban_rate_limit=1, ban_rate_limit_net=1, capacity=1000))
    for n in range(50_000):
        source = ip_address("fd00::") + n * 2**64
        guard.note(syn(source, mode=Mode.TCP), float(n))
        guard.should_log_refusal(source, float(n))
        guard.rate_limited(source, float(n))
    assert max(guard.sizes().values()) <= 1000


def test_engine_state_is_bounded_with_log_only_hosts():
    e = Engine(EngineSettings(block_tcp=0), set())
    for n in range(100_000):
        e.observe(syn(ip_address("fd00::") + n), float(n))
    sizes = e.state_sizes()
    assert sizes["blocked"] <= 65536 and sizes["trigger_ring"] <= 50 * 6


def test_bounded_set_evicts_oldest():
    s = BoundedSet(2)
    for n, address in enumerate(["198.18.0.1", "198.18.0.2", "198.18.0.1", "198.18.0.3"]):
        s.touch(ip_address(address), float(n))
    assert ip_address("198.18.0.1") in s and ip_address("198.18.0.2") not in s and len(s) == 2


def test_a_source_no_real_peer_can_have_never_blocks_whoever_hands_it_in():
    # Sensors drop these already; an admin block or a fleet decision reaches the engine directly.
    e = engine()
    for source in ("0.0.0.0", "224.0.0.1", "255.255.255.255", "127.0.0.1", "::1", "ff02::1"):
        actions = e.observe(syn(source), 1.0).actions
        assert not any(isinstance(a, Block) for a in actions), source
        assert "cannot be the source of a real packet" in texts(actions)[-1]


def test_a_block_that_goes_ahead_carries_no_refusal_reason():
    # issue 9.8: the event of a successful block said "ban rate limit reached".
    e = engine()
    outcome = e.observe(syn("198.18.0.2"), 1.0)
    assert (outcome.decision, outcome.reason) == ("block", None)
    e = engine(ban_rate_limit=1)
    e.observe(syn("198.18.0.2"), 1.0)
    outcome = e.observe(syn("198.18.0.3"), 2.0)
    assert (outcome.decision, outcome.reason) == ("refused", "ban rate limit reached")


def test_refused_sources_get_no_banner():
    # issue 9.8: PORT_BANNER answered forged UDP "from" the gateway: a reflection amplifier.
    from portsentry.core.actions import SendBanner
    from portsentry.core.probe import KIND_UDP

    def udp(source: str) -> Probe:
        return Probe(source=ip_address(source), port=7, mode=Mode.UDP, kind=KIND_UDP)

    e = Engine(EngineSettings(block_udp=1, kill_route=ROUTE, port_banner="go away",
                              guard=GuardSettings(ban_rate_limit=1)), set())
    e.guard.set_protected({GATEWAY})
    assert not any(isinstance(a, SendBanner) for a in e.observe(udp(str(GATEWAY)), 1.0).actions)
    assert any(isinstance(a, SendBanner) for a in e.observe(udp("198.18.0.2"), 2.0).actions)  # blocked
    over_the_cap = e.observe(udp("198.18.0.3"), 3.0).actions
    assert not any(isinstance(a, SendBanner) for a in over_the_cap)


def test_a_gateway_or_resolver_written_ipv4_mapped_is_protected_as_the_ipv4_host():
    # resolv.conf may say `nameserver ::ffff:198.18.0.53`; packets from that host come out of the
    # parser (and connect sensors) as plain IPv4, and must still be refused.
    e = Engine(EngineSettings(block_tcp=1, kill_route=ROUTE), set())
    e.guard.set_protected({ip_address("::ffff:198.18.0.53")})
    assert e.guard.refusal(syn("198.18.0.53"), 1.0) is not None
    outcome = e.observe(syn("198.18.0.53"), 1.0)
    assert not any(isinstance(a, Block) for a in outcome.actions)
    assert BanGuard(protected=frozenset({ip_address("::ffff:198.18.0.53")})).refusal(
        syn("198.18.0.53"), 1.0) is not None


def test_a_reload_puts_the_new_caps_and_sensitive_networks_in_force():
    # update_settings took the new EngineSettings but left the guard with the old GuardSettings:
    # after BAN_RATE_LIMIT 1 -> 60 the second ban of the minute was refused "(60 new bans per
    # minute)", and the kernel's first-probe ban counted by the new cap while the daemon kept
    # the old one; new SENSITIVE_NETWORKS were never asked for evidence.
    e = engine(ban_rate_limit=1)
    sensitive = (ip_network("198.18.4.0/24"),)
    e.update_settings(EngineSettings(block_tcp=1, kill_route=ROUTE,
                                     guard=GuardSettings(ban_rate_limit=60, sensitive_networks=sensitive)))
    assert e.guard.settings.ban_rate_limit == 60
    for n, source in enumerate(("198.18.0.2", "198.18.0.3", "198.18.0.4")):
        assert any(isinstance(a, Block) for a in e.observe(syn(source), 1.0 + n).actions)
    refused = e.observe(syn("198.18.4.7"), 5.0)
    assert (refused.decision, refused.reason) == (
        "refused", "stealth-only hit from a sensitive network without a completed TCP connection")
    e.update_settings(EngineSettings(block_tcp=1, kill_route=ROUTE, guard=GuardSettings(ban_rate_limit=3)))
    assert e.observe(syn("198.18.0.5"), 6.0).reason == "ban rate limit reached"  # three this minute
