"""Pins every classic text byte for byte: admins' greps and fail2ban depend on them."""

from __future__ import annotations

from ipaddress import ip_address

from portsentry.core import messages
from portsentry.core.probe import KIND_CONNECT, KIND_FIN, KIND_NULL, KIND_UDP, Mode, Probe, Protocol

V4 = ip_address("10.0.0.5")


def p(mode: Mode, kind: str = KIND_CONNECT, port: int = 111) -> Probe:
    return Probe(source=V4, port=port, mode=mode, kind=kind)


def test_lifecycle_texts():
    assert messages.starting("1.2") == "adminalert: PortSentry 1.2 is starting."
    assert messages.active() == "adminalert: PortSentry is now active and listening."
    assert messages.shutting_down() == ("securityalert: PortSentry is shutting down",
                                        "adminalert: PortSentry is shutting down")
    assert messages.listen_mode(Protocol.TCP, 1) == "adminalert: Going into listen mode on TCP port: 1"
    assert messages.stealth_listen_mode(Protocol.UDP, 7) == (
        "adminalert: Going into stealth listen mode on UDP port: 7")
    assert messages.bind_failed(Protocol.UDP, 53) == (
        "adminalert: ERROR: could not bind UDP socket: 53. Attempting to continue")
    assert messages.no_socket_bound(Protocol.TCP) == (
        "adminalert: ERROR: could not bind ANY TCP sockets. Shutting down.")
    assert messages.all_ports_in_use(Protocol.UDP) == (
        "adminalert: ERROR: All supplied UDP sockets are in use and will not be listened to. "
        "Shutting down.")
    assert messages.port_in_use(22) == (
        "adminalert: ERROR: Socket 22 is in use and will not be monitored. Attempting to continue")
    assert messages.reopened() == "adminalert: PortSentry reopened its log files"
    assert messages.advanced_monitor(1024) == "adminalert: Advanced mode will monitor first 1024 ports"
    assert messages.advanced_exclude(113) == "adminalert: Advanced mode will manually exclude port: 113 "
    assert messages.advanced_excluded(Protocol.TCP, 22) == (
        "adminalert: Advanced Stealth scan detection mode activated. Ignored TCP port: 22")


def test_a_mode_that_watches_nothing_while_the_daemon_goes_on_does_not_say_shutting_down():
    # -tcp -stcp: the -tcp sockets hold every TCP_PORTS port, so -stcp found them all in use and
    # said "... will not be listened to. Shutting down." while the daemon ran on with -tcp.
    assert messages.no_socket_bound(Protocol.TCP, Mode.TCP) == (
        "adminalert: ERROR: could not bind ANY TCP sockets: -tcp watches nothing")
    assert messages.all_ports_in_use(Protocol.TCP, Mode.STCP) == (
        "adminalert: ERROR: All supplied TCP sockets are in use and will not be listened to: "
        "-stcp watches nothing")


def test_detection_texts_per_mode():
    assert messages.detection(p(Mode.TCP)) == (
        "attackalert: Connect from host: 10.0.0.5/10.0.0.5 to TCP port: 111")
    assert messages.detection(p(Mode.UDP)) == (
        "attackalert: Connect from host: 10.0.0.5/10.0.0.5 to UDP port: 111")
    assert messages.detection(p(Mode.ATCP, KIND_FIN)) == (
        "attackalert: TCP FIN scan from host: 10.0.0.5/10.0.0.5 to TCP port: 111")
    # One space, not 1.2's two: see the module docstring of messages.
    assert messages.detection(p(Mode.STCP, KIND_NULL)) == (
        "attackalert: TCP NULL scan from host: 10.0.0.5/10.0.0.5 to TCP port: 111")
    assert messages.detection(p(Mode.AUDP, KIND_UDP)) == (
        "attackalert: UDP scan from host: 10.0.0.5/10.0.0.5 to UDP port: 111")


def test_already_blocked_keeps_1_2s_two_wordings():
    assert messages.already_blocked(p(Mode.TCP)) == (
        "attackalert: Host: 10.0.0.5 is already blocked. Ignoring")
    assert messages.already_blocked(p(Mode.STCP)) == (
        "attackalert: Host: 10.0.0.5/10.0.0.5 is already blocked Ignoring")


def test_action_texts():
    assert messages.blocked_via_wrappers("10.0.0.5", "ALL: 10.0.0.5") == (
        'attackalert: Host 10.0.0.5 has been blocked via wrappers with string: "ALL: 10.0.0.5"')
    assert messages.blocked_via_route("10.0.0.5", "/sbin/route add -host 10.0.0.5 reject") == (
        'attackalert: Host 10.0.0.5 has been blocked via dropped route using command: '
        '"/sbin/route add -host 10.0.0.5 reject"')
    assert messages.external_command("10.0.0.5", "x 10.0.0.5") == (
        'attackalert: External command run for host: 10.0.0.5 using command: "x 10.0.0.5"')
    assert messages.block_disabled(Protocol.UDP) == (
        "attackalert: Ignoring UDP response per configuration file setting.")
    assert messages.block_failed(p(Mode.TCP)) == "attackalert: ERROR: Could not block host 10.0.0.5 !!"
    assert messages.block_failed(p(Mode.STCP)) == (
        "attackalert: ERROR: Could not block host 10.0.0.5/10.0.0.5 !!")
    assert messages.block_failed(p(Mode.ATCP)) == (
        "attackalert: ERROR: Could not block host 10.0.0.5/10.0.0.5!!")
    assert messages.ip_options(p(Mode.STCP)) == (
        "attackalert: Packet from host: 10.0.0.5/10.0.0.5 to TCP port: 111 has IP options set "
        "(detection avoidance technique).")
    assert messages.accept_failed(1) == (
        "attackalert: Possible stealth scan from unknown host to TCP port: 1 (accept failed)")


def test_admin_request_texts():
    assert (messages.admin_done("unblock 198.18.0.2", "root (uid 0, pid 42)")
            == "adminalert: unblock 198.18.0.2 by root (uid 0, pid 42): done")
    assert (messages.admin_done("flush", "root (uid 0, pid 42)", "removed nftables: table inet portsentry")
            == "adminalert: flush by root (uid 0, pid 42): removed nftables: table inet portsentry")
    assert (messages.admin_failed("unblock 198.18.0.2", "root (uid 0, pid 42)", "198.18.0.2 is not blocked")
            == "adminalert: ERROR: unblock 198.18.0.2 by root (uid 0, pid 42) failed: "
               "198.18.0.2 is not blocked")
