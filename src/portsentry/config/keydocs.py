"""What each configuration key means, for portsentry.conf(5). The manual page is generated from
the key table (settings.KEYS: names, defaults, allowed values) and these texts; a test fails when a
key has no text here or a text has no key, so the page never drifts from the parser."""

from __future__ import annotations

from typing import Final

# Sections, in the page's order: (title, keys).
SECTIONS: Final = (
    ("PORTS (PortSentry 1.2)", ("TCP_PORTS", "UDP_PORTS", "ADVANCED_PORTS_TCP", "ADVANCED_PORTS_UDP",
                                "ADVANCED_EXCLUDE_TCP", "ADVANCED_EXCLUDE_UDP")),
    ("FILES (PortSentry 1.2)", ("IGNORE_FILE", "HISTORY_FILE", "BLOCKED_FILE")),
    ("RESPONSE (PortSentry 1.2)", ("RESOLVE_HOST", "BLOCK_TCP", "BLOCK_UDP", "KILL_ROUTE", "KILL_HOSTS_DENY",
                                   "KILL_RUN_CMD", "KILL_RUN_CMD_FIRST", "SCAN_TRIGGER", "PORT_BANNER")),
    ("BANS", ("HOSTS_DENY_FILE", "COMMAND_TIMEOUT", "BLOCK_TIME", "BLOCK_TIME_FACTOR", "BLOCK_TIME_MAX",
              "KILL_ROUTE_UNDO", "HISTORY_RETENTION", "HISTORY_MAX_ROWS", "STATE_DIR")),
    ("KERNEL", ("BAN_BACKEND", "NFT_TABLE", "NFT_HOOK", "NFT_PRIORITY", "BAN_SET_SIZE", "CAPTURE",
                "NFLOG_GROUP", "KERNEL_BAN", "FAST_LANE")),
    ("GUARDS", ("PROTECT_GATEWAYS", "PROTECT_RESOLVERS", "RESOLV_CONF", "BAN_RATE_LIMIT",
                "BAN_RATE_LIMIT_NET", "SENSITIVE_NETWORKS")),
    ("OPERATION", ("CONTROL_SOCKET", "EVENT_LOG", "METRICS_LISTEN", "LOG_REPEAT_LIMIT", "LOG_REPEAT_WINDOW",
                   "KEEP_CAPABILITIES")),
    ("FLEET", ("FLEET_REDIS_URL", "FLEET_NAME", "FLEET_HOST_ID", "FLEET_KEY_FILE", "FLEET_PASSWORD_FILE",
               "FLEET_ACCEPT_HOSTS", "FLEET_BAN_RATE_LIMIT")),
)

DOCS: Final[dict[str, str]] = {
    "TCP_PORTS": "Comma-separated TCP ports (ranges a-b allowed) that -tcp binds and -stcp watches.",
    "UDP_PORTS": "Comma-separated UDP ports that -udp binds and -sudp watches.",
    "ADVANCED_PORTS_TCP": "-atcp watches every TCP port below this number that has no service.",
    "ADVANCED_PORTS_UDP": "-audp watches every UDP port below this number that has no service.",
    "ADVANCED_EXCLUDE_TCP": "TCP ports -atcp never reports (ident, NetBIOS...).",
    "ADVANCED_EXCLUDE_UDP": "UDP ports -audp never reports (RIP, NetBIOS, bootp...).",
    "IGNORE_FILE": "Hosts and networks (CIDR allowed) never blocked, one per line; edits take effect "
                   "at once. When the file is missing, or Debian's init script generated it, and "
                   "FILE.static exists, that is used.",
    "HISTORY_FILE": "Every block is appended here in 1.2's format (fail2ban's portsentry filter reads it).",
    "BLOCKED_FILE": "Prefix of the per-mode blocked files (FILE.tcp, FILE.atcp...), 1.2's format.",
    "RESOLVE_HOST": "1: look up the scanner's name for the log lines (off the detection path).",
    "BLOCK_TCP": "0: log only; 1: block (native backend, hosts.deny, KILL_ROUTE); 2: run KILL_RUN_CMD only.",
    "BLOCK_UDP": "As BLOCK_TCP, for UDP scans.",
    "KILL_ROUTE": "Command that blocks $TARGET$ (also $PORT$, $MODE$), run without a shell's word "
                  "splitting of the address; its exit status decides whether the block worked.",
    "KILL_HOSTS_DENY": "Line appended to HOSTS_DENY_FILE, e.g. \"ALL: $TARGET$ : DENY\"; only the "
                       "lines portsentry wrote are ever removed.",
    "KILL_RUN_CMD": "Command run for every blocked host (notification, external firewall).",
    "KILL_RUN_CMD_FIRST": "1: run KILL_RUN_CMD before the blocking steps instead of after.",
    "SCAN_TRIGGER": "Hits from one source before it counts as a scan; 0 and 1 act on the first.",
    "PORT_BANNER": "Text written to a client of the connect modes before the connection is closed; "
                   "a UDP source gets it once, not again while it is blocked.",
    "HOSTS_DENY_FILE": "The TCP wrappers file KILL_HOSTS_DENY writes to.",
    "COMMAND_TIMEOUT": "Seconds KILL_ROUTE, KILL_RUN_CMD and KILL_ROUTE_UNDO may run before they are killed.",
    "BLOCK_TIME": "Seconds a ban lasts; 0 keeps 1.2's ban until `portsentry unblock`.",
    "BLOCK_TIME_FACTOR": "Each further ban of the same host lasts this many times longer.",
    "BLOCK_TIME_MAX": "The longest ban escalation reaches, in seconds (0: no cap).",
    "KILL_ROUTE_UNDO": ("Command that lifts a KILL_ROUTE when a ban it ran for expires or is unblocked; "
                        "a fleet peer's ban, a kernel ban it never ran for and a ban whose KILL_ROUTE "
                        "failed (a route that was already there, such as 1.2's) are left alone."),
    "HISTORY_RETENTION": "Seconds the ban store keeps its history of bans and lifts, and offender "
                         "records (0: no limit).",
    "HISTORY_MAX_ROWS": "At most this many history entries are kept (0: no limit).",
    "STATE_DIR": "Where the ban store (bans.sqlite3) and the kernel identity live.",
    "BAN_BACKEND": "Native bans in the kernel: nftables, ipset, route, auto (the first that works) or "
                   "none (only the classic commands).",
    "NFT_TABLE": "The nftables table (family inet) portsentry owns.",
    "NFT_HOOK": "The hook of its drop chain: input, forward or prerouting.",
    "NFT_PRIORITY": "The priority of its drop chain; the capture chain sits one step after it.",
    "BAN_SET_SIZE": "Elements each ban set may hold.",
    "CAPTURE": "How stealth modes see packets: auto (NFLOG with nftables, else AF_PACKET), nflog or packet.",
    "NFLOG_GROUP": "The NFLOG group of the capture rules.",
    "KERNEL_BAN": "auto: with the NFLOG capture the kernel bans a stealth probe's source on its first "
                  "packet, so the scanner's next packet is already dropped; off: the daemon bans.",
    "FAST_LANE": "auto: with the AF_PACKET capture, a lone TCP SYN, FIN, NULL or XMAS probe that the "
                 "daemon would block on its first hit gets its detection line, its record and "
                 "KILL_ROUTE from compiled C in a fraction of a millisecond, and the daemon does "
                 "the rest (status says whether it is on, and why not); off: every probe goes "
                 "through the daemon's Python.",
    "PROTECT_GATEWAYS": "1: never block this host's default gateways, whatever forged packets say.",
    "PROTECT_RESOLVERS": "1: never block the DNS resolvers in RESOLV_CONF.",
    "RESOLV_CONF": "Where the resolvers are read from.",
    "BAN_RATE_LIMIT": "At most this many new bans a minute (0: no cap); a forged flood cannot ban the "
                      "whole internet.",
    "BAN_RATE_LIMIT_NET": "At most this many new bans a minute per /24 (IPv4) or /64 (IPv6); 0: no cap.",
    "SENSITIVE_NETWORKS": "Networks whose hosts are blocked only after a completed connection, "
                          "which cannot be forged.",
    "CONTROL_SOCKET": "The Unix socket `portsentry status`, `list`, `block` and `unblock` talk to.",
    "EVENT_LOG": "A file of JSON lines, one per probe, ban and unban, for a SIEM.",
    "METRICS_LISTEN": "HOST:PORT of a Prometheus /metrics endpoint (off when empty).",
    "LOG_REPEAT_LIMIT": "Lines logged per blocked host and mode per window; the rest become one "
                        "summary line (0: every hit, as 1.2).",
    "LOG_REPEAT_WINDOW": "The window of LOG_REPEAT_LIMIT, in seconds.",
    "KEEP_CAPABILITIES": "Capabilities kept for KILL_RUN_CMD beyond those portsentry itself needs.",
    "FLEET_REDIS_URL": "Share bans with a fleet through this Redis: redis://[user@]host:port/db, rediss:// "
                       "(TLS; ?ssl_ca_certs=FILE), redis+sentinel://host:port[,host:port]/service, "
                       "redis+cluster://host:port[,host:port]; empty: no fleet.",
    "FLEET_NAME": "The fleet's name: its Redis keys share the hash tag {NAME} (one Cluster slot).",
    "FLEET_HOST_ID": "This host in the fleet (default: the host name); shown as the origin of its bans.",
    "FLEET_KEY_FILE": "The shared key every decision is signed with (HMAC-SHA256), at least 16 bytes, "
                      "mode 600; required with FLEET_REDIS_URL.",
    "FLEET_PASSWORD_FILE": "The Redis ACL user's password (the user is in the URL), mode 600; never logged.",
    "FLEET_ACCEPT_HOSTS": "Host ids whose decisions are applied here (empty: every host with the key).",
    "FLEET_BAN_RATE_LIMIT": "At most this many fleet bans applied a minute (0: no cap); the active set "
                            "loaded at start is not capped.",
}
