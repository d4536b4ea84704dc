from tests.system.rig import tcp_connect, udp_send, nmap, nmap_ports
def test_real(daemon_factory, namespaces, syslog):
    d = daemon_factory("-tcp", "-udp", TCP_PORTS="1,31337", UDP_PORTS="31337")
    net = namespaces
    print(tcp_connect(net.scanner, net.target_ip4, 1))
    print(udp_send(net.scanner2, net.target2_ip4, 31337, reply_timeout=1))
    print(tcp_connect(net.scanner, net.target_ip6, 31337))
    print(nmap_ports(nmap(net.scanner, ["-sT", "-p", "1,2,31337", net.target_ip4]).stdout))
    import time; time.sleep(0.5)
    print(syslog.describe())
    print(d.history_text())
    assert d.stop() == 0
    print(d.stderr_text()[-300:])
    assert syslog.malformed() == []
