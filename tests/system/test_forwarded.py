"""Traffic the host serves by NAT is no probe: a port published by DNAT (Docker's or Kubernetes'
published ports without a userland proxy) to a service behind it, or by REDIRECT to a local
service on another port (a transparent proxy).

An AF_PACKET tap sees such a SYN before netfilter, addressed to this host, to a port no local
socket holds: it was called a probe, and with -atcp every client of a published port under 1024
was banned. 1.2's raw sockets, and our NFLOG capture in the input hook, see packets after NAT."""

from __future__ import annotations

import json
import sys

import pytest

from tests.system.rig import Listener, daemon_env, run_in, tcp_connect
from tests.system.test_stealth_modes import FAMILIES, ROUTE, addresses

PORT = 80
PROXY_PORT = 8080


def _publish(net, family: str, how: str) -> None:
    """The target forwards PORT to scanner2 (as a container host does) or hands it to its own
    PROXY_PORT, with nat in the target namespace's own table."""
    _flags, _target, _scanner, _target2, scanner2 = addresses(net, family)
    run_in(net.target, ["sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"],
           check=True)
    nft = "ip" if family == "ipv4" else "ip6"
    where = scanner2 if family == "ipv4" else f"[{scanner2}]"
    action = f"dnat to {where}:{PORT}" if how == "dnat" else f"redirect to :{PROXY_PORT}"
    script = (f"table {nft} published {{\n chain pre {{\n  type nat hook prerouting priority dstnat;\n"
              f"  tcp dport {PORT} {action}\n }}\n}}\n")
    run_in(net.target, ["nft", "-f", "-"], input_text=script, check=True)


def _nat_in_use(ns: str) -> bool:
    code = "import json; from portsentry.sensors.conntrack import nat_in_use; print(json.dumps(nat_in_use()))"
    return bool(json.loads(run_in(ns, [sys.executable, "-c", code], env=daemon_env(), check=True).stdout))


@pytest.mark.parametrize("how", ["dnat", "redirect"])
@pytest.mark.parametrize("backend", ["none", "nftables"])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_client_of_a_port_published_by_nat_is_not_a_scanner(daemon_factory, namespaces, syslog,
                                                               family, backend, how):
    net = namespaces
    _flags, target, scanner, _target2, _scanner2 = addresses(net, family)
    assert not _nat_in_use(net.target)  # the sensor asks conntrack only where NAT is in use
    _publish(net, family, how)
    assert _nat_in_use(net.target)
    daemon_factory("-atcp", BLOCK_TCP="1", KILL_ROUTE=ROUTE, BAN_BACKEND=backend)
    server_ns, server_port = (net.scanner2, PORT) if how == "dnat" else (net.target, PROXY_PORT)
    with Listener(server_ns, "tcp", server_port, banner=b"hello\n") as service:
        for _ in range(3):
            assert tcp_connect(net.scanner, target, PORT).connected
        service.wait_for_peer(scanner)
    syslog.assert_absent(f"to TCP port: {PORT}", wait=1.5)
    syslog.assert_absent(f"Host {scanner} has been blocked", wait=0.1)
    # Still a detector: a closed port of the host itself is a probe.
    assert not tcp_connect(net.scanner, target, 1).connected
    syslog.wait_for("to TCP port: 1")
