"""Every classic 1.2 log text in one place, byte-exact, so admins' greps and fail2ban keep matching.

Each function returns the message body that follows `portsentry[PID]: ` in syslog. The unit test
pins each text; change one only on purpose. Where 1.2 had a quirk we chose not to copy, the
function says so.
"""

from __future__ import annotations

from portsentry.core.probe import Mode, Probe, Protocol

# -- lifecycle ---------------------------------------------------------------------------------


def starting(version: str) -> str:
    return f"adminalert: PortSentry {version} is starting."


def active() -> str:
    return "adminalert: PortSentry is now active and listening."


def shutting_down() -> tuple[str, str]:
    return ("securityalert: PortSentry is shutting down", "adminalert: PortSentry is shutting down")


def listen_mode(protocol: Protocol, port: int) -> str:
    return f"adminalert: Going into listen mode on {protocol} port: {port}"


def stealth_listen_mode(protocol: Protocol, port: int) -> str:
    return f"adminalert: Going into stealth listen mode on {protocol} port: {port}"


def bind_failed(protocol: Protocol, port: int) -> str:
    return f"adminalert: ERROR: could not bind {protocol} socket: {port}. Attempting to continue"


def out_of_descriptors(protocol: Protocol, ports: str, limit: int) -> str:
    """Ours: 1.2 could not get there (it watched at most 64 ports)."""
    return (f"adminalert: ERROR: not watching {protocol} ports {ports}: out of file descriptors "
            f"(limit {limit}; raise LimitNOFILE). Attempting to continue")


def no_socket_bound(protocol: Protocol, mode: Mode | None = None) -> str:
    """1.2's words when this mode is the daemon's only one, at start: the daemon then shuts down,
    as 1.2 did. `mode` otherwise (other modes, a reload): the daemon goes on, so no "Shutting
    down", and the line names the mode that watches nothing."""
    if mode is None:
        return f"adminalert: ERROR: could not bind ANY {protocol} sockets. Shutting down."
    return f"adminalert: ERROR: could not bind ANY {protocol} sockets: -{mode} watches nothing"


def port_in_use(port: int) -> str:
    return f"adminalert: ERROR: Socket {port} is in use and will not be monitored. Attempting to continue"


def all_ports_in_use(protocol: Protocol, mode: Mode | None = None) -> str:
    """As no_socket_bound: 1.2's words only where the daemon then shuts down."""
    text = f"adminalert: ERROR: All supplied {protocol} sockets are in use and will not be listened to"
    return f"{text}. Shutting down." if mode is None else f"{text}: -{mode} watches nothing"


def advanced_exclude_none() -> str:
    return "adminalert: Advanced mode will manually exclude no ports"


def advanced_monitor(limit: int) -> str:
    return f"adminalert: Advanced mode will monitor first {limit} ports"


def advanced_exclude(port: int) -> str:
    # 1.2's format string ends in a space; admins never saw it (syslog keeps it, but nobody greps it).
    return f"adminalert: Advanced mode will manually exclude port: {port} "


def advanced_excluded(protocol: Protocol, port: int) -> str:
    return (
        f"adminalert: Advanced Stealth scan detection mode activated. Ignored {protocol} port: {port}"
    )


def config_error(text: str) -> str:
    return f"adminalert: ERROR: {text}"


# -- detection ---------------------------------------------------------------------------------


def detection(probe: Probe) -> str:
    """The first line for every hit; 1.2 words it per mode."""
    who = _who(probe)
    protocol = probe.mode.protocol
    if probe.mode.is_classic:
        return f"attackalert: Connect from host: {who} to {protocol} port: {probe.port}"
    if protocol is Protocol.UDP:
        return f"attackalert: UDP scan from host: {who} to UDP port: {probe.port}"
    # 1.2 wrote " TCP NULL scan" with a leading space (two spaces after the colon); we write one.
    return f"attackalert: {probe.kind} from host: {who} to TCP port: {probe.port}"


def ip_options(probe: Probe) -> str:
    return (
        f"attackalert: Packet from host: {probe.name}/{probe.source} to {probe.mode.protocol} "
        f"port: {probe.port} has IP options set (detection avoidance technique)."
    )


def already_blocked(probe: Probe) -> str:
    # The two wordings are 1.2's: classic modes end in a period, stealth modes do not.
    if probe.mode.is_classic:
        return f"attackalert: Host: {probe.source} is already blocked. Ignoring"
    return f"attackalert: Host: {_who(probe)} is already blocked Ignoring"


def _who(probe: Probe) -> str:
    """name/address; the address is formatted once (ipaddress's str() is not cheap, and these
    lines are written for every hit of a flood)."""
    address = str(probe.source)
    return f"{probe.source_name or address}/{address}"


def repeats_suppressed(probe: Probe, count: int, window: float) -> str:
    """Ours: replaces `count` pairs of detection + already-blocked lines (LOG_REPEAT_LIMIT)."""
    return (
        f"attackalert: Host: {probe.name}/{probe.source} is already blocked: {count} more "
        f"{probe.mode.protocol} hits in {int(window)} seconds not logged (last to port {probe.port})"
    )


def pending_overflow(probe: Probe, count: int) -> str:
    """Ours: `count` hits that came while the host's block was under way, beyond what is kept to
    be logged one by one once it is done (engine.PENDING_CAPACITY)."""
    return (
        f"attackalert: Host: {probe.name}/{probe.source} is already blocked: {count} more "
        f"{probe.mode.protocol} hits while its block was under way not logged (last to port {probe.port})"
    )


def block_refused(probe: Probe, reason: str) -> str:
    return f"attackalert: Host: {probe.name}/{probe.source} is not blocked: {reason}"


def rate_limit_reached(limit: int) -> str:
    return (f"attackalert: ban rate limit reached ({limit} new bans per minute): further hits are "
            "counted, not blocked")


def rate_limit_summary(count: int) -> str:
    return f"attackalert: ban rate limit: {count} hits in the last minute were not acted on"


def ignored_host(probe: Probe) -> str:
    """Verbose only: 1.2 was silent about ignored hosts."""
    return f"attackalert: Host: {probe.source} found in ignore file, aborting actions"


def below_trigger(probe: Probe, count: int, trigger: int) -> str:
    """Verbose only: 1.2 was silent below SCAN_TRIGGER."""
    return (
        f"attackalert: Host: {probe.source} hit {count} of {trigger} (SCAN_TRIGGER), "
        "not acting yet"
    )


def block_disabled(protocol: Protocol) -> str:
    return f"attackalert: Ignoring {protocol} response per configuration file setting."


# -- actions -----------------------------------------------------------------------------------


def blocked_via_wrappers(target: str, line: str) -> str:
    return f'attackalert: Host {target} has been blocked via wrappers with string: "{line}"'


def blocked_via_route(target: str, command: str) -> str:
    return f'attackalert: Host {target} has been blocked via dropped route using command: "{command}"'


def external_command(target: str, command: str) -> str:
    return f'attackalert: External command run for host: {target} using command: "{command}"'


def block_failed(probe: Probe) -> str:
    if probe.mode.is_classic:
        return f"attackalert: ERROR: Could not block host {probe.source} !!"
    if probe.mode is Mode.STCP:
        return f"attackalert: ERROR: Could not block host {probe.name}/{probe.source} !!"
    return f"attackalert: ERROR: Could not block host {probe.name}/{probe.source}!!"


def route_failed(target: str, detail: str) -> str:
    # 1.2: "(system fail)"; we add what the command said so the admin can fix it.
    return f"adminalert: ERROR: There was an error trying to block host (system fail) {target}: {detail}"


def command_failed(target: str, detail: str) -> str:
    return f"adminalert: ERROR: There was an error trying to run command (system fail) {target}: {detail}"


def hosts_deny_failed(path: str, target: str, detail: str) -> tuple[str, str]:
    return (
        f"adminalert: cannot open hosts.deny file: {path} for blocking. ({detail})",
        f"securityalert: ERROR: There was an error trying to block host {target}",
    )


def hosts_deny_present(target: str) -> str:
    """Ours (2.x wording): the exact line was already there, so nothing was appended."""
    return f"Host {target} already in hosts.deny file, skipping."


def trigger_too_large(trigger: int, capacity: int) -> tuple[str, str]:
    return (
        f"securityalert: WARNING: Trigger value {trigger} is larger than state engine capacity "
        f"of {capacity}.",
        "Adjust the value lower or recompile with a larger state engine value.",
    )


def trigger_too_large_blocking() -> str:
    return "securityalert: Blocking host anyway because of invalid trigger value"


def accept_failed(port: int) -> str:
    return (
        f"attackalert: Possible stealth scan from unknown host to TCP port: {port} (accept failed)"
    )


def file_error(kind: str, path: str, detail: str) -> str:
    return f"adminalert: ERROR: Cannot open {kind} file: {path}. ({detail})"


# -- ban lifecycle (ours; 1.2 never lifted a block) --------------------------------------------


def blocked_via_native(target: str, backend: str, duration: float | None) -> str:
    how_long = "forever" if duration is None else f"for {int(duration)} seconds"
    return f"attackalert: Host {target} has been blocked via {backend} {how_long}"


def native_block_failed(target: str, backend: str, detail: str) -> str:
    return f"adminalert: ERROR: There was an error trying to block host {target} via {backend}: {detail}"


def native_unblock_failed(target: str, detail: str) -> str:
    return f"adminalert: ERROR: There was an error trying to unblock host {target}: {detail}"


def kernel_ban_recorded(target: str, protocol: str, port: int) -> str:
    """A first-probe ban the kernel made whose NFLOG copy never reached the daemon."""
    return (f"attackalert: Host {target} was blocked by the kernel on its first probe to {protocol} port "
            f"{port}; its copy never reached PortSentry (log buffer overrun, or PortSentry was not "
            "running): recorded now")


def kernel_dropped(target: str, count: int) -> str:
    """Ours: probes of a banned source that the kernel dropped before PortSentry saw them
    (nft_capture.count_rules), one line per source and summary round."""
    return (f"attackalert: Host: {target}/{target} is already blocked: {count} more probes to "
            "watched ports dropped by the kernel, not logged one by one")


def kernel_ban_lifted(target: str, why: str) -> str:
    return f"adminalert: The kernel's first-probe ban of {target} was lifted: {why}"


def unblocked(target: str, reason: str) -> str:
    return f"attackalert: Host {target} has been unblocked: {reason}"


def ban_time_changed(target: str, old: str, new: str) -> str:
    """Ours: `block` of an address already banned moved its ban's end (`old` and `new` as
    "until <time>" or "forever"); no new ban, no hosts.deny line, no KILL_ROUTE."""
    return f"adminalert: {target} was already blocked: its ban now lasts {new} instead of {old}"


def ban_time_kept(target: str, old: str, asked: str) -> str:
    """Ours: `block` of an address already banned at least as long as asked: nothing changed."""
    return (f"adminalert: {target} was already blocked {old}, not shorter than asked ({asked}): its "
            "ban stays as it is (unblock it first for a shorter one)")


def reloaded(source: str) -> str:
    return f"adminalert: PortSentry reloaded its configuration from {source}"


def reopened() -> str:
    return "adminalert: PortSentry reopened its log files"


def reload_rejected(detail: str) -> str:
    return f"adminalert: ERROR: reload refused, the running configuration stays in force: {detail}"


def table_rebuilt(backend: str) -> str:
    return (f"securityalert: WARNING: our firewall table was gone (ruleset flushed?); rebuilt "
            f"{backend} and re-added the active bans")


def store_recovered(path: str) -> str:
    return f"adminalert: ban store {path} is usable again; bans kept in memory were saved"


def store_failed(detail: str) -> str:
    return f"adminalert: ERROR: ban store: {detail}"


# -- the admin's requests (ours: 1.2 had none) -------------------------------------------------


def admin_done(action: str, who: str, outcome: str = "done") -> str:
    """One line per ban-changing admin command (block, unblock, flush), after the lines of what
    it did: which command, who gave it and how it ended. `adminalert:`, never `attackalert:`,
    and no "Host:" text: filters that take 1.2's attackalert lines as a scanner's must not
    ban the address an admin just unblocked."""
    return f"adminalert: {action} by {who}: {outcome}"


def admin_failed(action: str, who: str, error: str) -> str:
    return f"adminalert: ERROR: {action} by {who} failed: {error}"
