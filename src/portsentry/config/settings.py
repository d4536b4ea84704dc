"""Reads classic PortSentry 1.2 configuration files (KEY="value" lines) into a frozen Config,
loudly: every mistake 1.2 silently tolerated is a ConfigError or a warning naming file and line."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from types import MappingProxyType
from typing import Any, Final

from portsentry.config import values as v
from portsentry.config.effective import engine_settings as engine_settings
from portsentry.config.effective import format_effective as format_effective
from portsentry.config.errors import ConfigError as ConfigError
from portsentry.config.errors import located as _located
from portsentry.core.flood import DEFAULT_LIMIT, DEFAULT_WINDOW

DEFAULT_CONFIG_PATH: Final = "/etc/portsentry/portsentry.conf"
EMBEDDED_SOURCE: Final = "<embedded default>"

# Far beyond any real config; guards against being pointed at /dev/zero or a log file.
_MAX_FILE_BYTES: Final = 1024 * 1024


@dataclass(frozen=True)
class Config:
    """Every setting PortSentry reads from its configuration file, with 1.2's defaults."""

    source: str
    tcp_ports: tuple[int, ...] = ()
    udp_ports: tuple[int, ...] = ()
    advanced_ports_tcp: int = 1024
    advanced_ports_udp: int = 1024
    advanced_exclude_tcp: tuple[int, ...] = ()
    advanced_exclude_udp: tuple[int, ...] = ()
    ignore_file: str | None = None
    history_file: str | None = None
    blocked_file: str | None = None
    resolve_host: bool = False
    block_tcp: int = 0  # 0 log only, 1 block, 2 run KILL_RUN_CMD only
    block_udp: int = 0
    kill_route: str | None = None
    kill_hosts_deny: str | None = None
    kill_run_cmd: str | None = None
    kill_run_cmd_first: bool = False
    scan_trigger: int = 0
    port_banner: str | None = None
    hosts_deny_file: str = "/etc/hosts.deny"  # HOSTS_DENY_FILE: our extension
    command_timeout: float = 30.0  # COMMAND_TIMEOUT seconds: our extension
    # Ban lifecycle (ours). BLOCK_TIME 0 keeps 1.2's "blocked until the admin lifts it".
    block_time: int = 0
    block_time_factor: float = 2.0
    block_time_max: int = 7 * 86400
    kill_route_undo: str | None = None
    # Ban history and offender records: pruned by age and by count (0 = no limit).
    history_retention: int = 90 * 86400
    history_max_rows: int = 1_000_000
    ban_backend: str = "none"  # none | auto | nftables | ipset | route
    nft_table: str = "portsentry"
    nft_hook: str = "input"
    nft_priority: int = -10
    ban_set_size: int = 262144
    capture: str = "auto"  # stealth capture: auto (nflog with the nftables backend) | nflog | packet
    nflog_group: int = 7373
    # First-probe ban in the kernel (stealth modes, nftables capture): auto | off
    kernel_ban: str = "auto"
    # The fast lane (sensors/lane.c): a lone TCP stealth probe's line and KILL_ROUTE from C: auto | off
    fast_lane: str = "auto"
    state_dir: str = "/var/lib/portsentry"
    control_socket: str = "/run/portsentry/control.sock"
    event_log: str | None = None  # EVENT_LOG: JSON lines for SIEMs (docs/events.md)
    metrics_listen: str | None = None  # METRICS_LISTEN: e.g. 127.0.0.1:9470 for Prometheus
    # Hits logged per blocked host and mode per window; 0 = every hit (1.2). flood.py says why.
    log_repeat_limit: int = DEFAULT_LIMIT
    log_repeat_window: float = DEFAULT_WINDOW
    # Spoofing guards (ours)
    protect_gateways: bool = True
    protect_resolvers: bool = True
    resolv_conf: str = "/etc/resolv.conf"
    ban_rate_limit: int = 60
    ban_rate_limit_net: int = 0
    sensitive_networks: tuple[IPv4Network | IPv6Network, ...] = ()
    keep_capabilities: str | None = None  # KEEP_CAPABILITIES: more for KILL_RUN_CMD (privileges.py)
    # Bans shared with a fleet through Redis (docs/fleet.md); no URL, no fleet.
    fleet_redis_url: str | None = None
    fleet_name: str = "portsentry"
    fleet_host_id: str | None = None  # None: the host name
    fleet_key_file: str | None = None
    fleet_password_file: str | None = None
    fleet_accept_hosts: tuple[str, ...] = ()
    fleet_ban_rate_limit: int = 6000
    # KEY -> line it was set on, so later stages can blame the right line.
    lines: Mapping[str, int] = field(default_factory=dict, hash=False)

    def line_of(self, key: str) -> int | None:
        return self.lines.get(key)

    def error(self, key: str, message: str) -> ConfigError:
        """An error about a setting, for problems found after parsing (e.g. at startup)."""
        return ConfigError(self.source, self.line_of(key), key, message)


@dataclass(frozen=True)
class LoadedConfig:
    config: Config
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class KeySpec:
    """How one configuration key is stored: the Config field and the text-to-value converter.

    `labels[n]` names what integer value n means, for check-config listings.
    """

    field: str
    convert: Callable[[str], object]
    labels: tuple[str, ...] = ()


# The one table of accepted keys, in the order check-config lists them.
KEYS: Final[Mapping[str, KeySpec]] = MappingProxyType(
    {
        "TCP_PORTS": KeySpec("tcp_ports", v.port_list),
        "UDP_PORTS": KeySpec("udp_ports", v.port_list),
        "ADVANCED_PORTS_TCP": KeySpec("advanced_ports_tcp", v.PORT_COUNT),
        "ADVANCED_PORTS_UDP": KeySpec("advanced_ports_udp", v.PORT_COUNT),
        "ADVANCED_EXCLUDE_TCP": KeySpec("advanced_exclude_tcp", v.port_list),
        "ADVANCED_EXCLUDE_UDP": KeySpec("advanced_exclude_udp", v.port_list),
        "IGNORE_FILE": KeySpec("ignore_file", v.optional_path),
        "HISTORY_FILE": KeySpec("history_file", v.optional_path),
        "BLOCKED_FILE": KeySpec("blocked_file", v.optional_path),
        "RESOLVE_HOST": KeySpec("resolve_host", v.flag, ("off", "on")),
        "BLOCK_TCP": KeySpec("block_tcp", v.BLOCK, v.BLOCK_LABELS),
        "BLOCK_UDP": KeySpec("block_udp", v.BLOCK, v.BLOCK_LABELS),
        "KILL_ROUTE": KeySpec("kill_route", v.command_with_target),
        "KILL_HOSTS_DENY": KeySpec("kill_hosts_deny", v.command_with_target),
        "KILL_RUN_CMD": KeySpec("kill_run_cmd", v.optional),
        "KILL_RUN_CMD_FIRST": KeySpec(
            "kill_run_cmd_first", v.flag, ("after blocking", "before blocking")
        ),
        "SCAN_TRIGGER": KeySpec("scan_trigger", v.TRIGGER),
        "PORT_BANNER": KeySpec("port_banner", v.optional),
        "HOSTS_DENY_FILE": KeySpec("hosts_deny_file", v.required_path),
        "COMMAND_TIMEOUT": KeySpec("command_timeout", v.seconds),
        "BLOCK_TIME": KeySpec("block_time", v.DURATION),
        "BLOCK_TIME_FACTOR": KeySpec("block_time_factor", v.factor),
        "BLOCK_TIME_MAX": KeySpec("block_time_max", v.DURATION),
        "KILL_ROUTE_UNDO": KeySpec("kill_route_undo", v.command_with_target),
        "HISTORY_RETENTION": KeySpec("history_retention", v.DURATION),
        "HISTORY_MAX_ROWS": KeySpec("history_max_rows", v.ROWS),
        "BAN_BACKEND": KeySpec("ban_backend", v.choice("none", "auto", "nftables", "ipset", "route")),
        "NFT_TABLE": KeySpec("nft_table", v.nft_table),
        "NFT_HOOK": KeySpec("nft_hook", v.choice("input", "forward", "prerouting")),
        "NFT_PRIORITY": KeySpec("nft_priority", v.priority),
        "BAN_SET_SIZE": KeySpec("ban_set_size", v.integer(1, 16_777_216, "a set size from 1 to 16777216")),
        "CAPTURE": KeySpec("capture", v.choice("auto", "nflog", "packet")),
        "NFLOG_GROUP": KeySpec("nflog_group", v.integer(0, 65535, "a log group from 0 to 65535")),
        "KERNEL_BAN": KeySpec("kernel_ban", v.choice("auto", "off")),
        "FAST_LANE": KeySpec("fast_lane", v.choice("auto", "off")),
        "STATE_DIR": KeySpec("state_dir", v.absolute_path),
        "CONTROL_SOCKET": KeySpec("control_socket", v.absolute_path),
        "EVENT_LOG": KeySpec("event_log", v.optional_path),
        "METRICS_LISTEN": KeySpec("metrics_listen", v.listen),
        "LOG_REPEAT_LIMIT": KeySpec("log_repeat_limit", v.LINES),
        "LOG_REPEAT_WINDOW": KeySpec("log_repeat_window", v.seconds),
        "PROTECT_GATEWAYS": KeySpec("protect_gateways", v.flag, ("off", "on")),
        "PROTECT_RESOLVERS": KeySpec("protect_resolvers", v.flag, ("off", "on")),
        "RESOLV_CONF": KeySpec("resolv_conf", v.absolute_path),
        "BAN_RATE_LIMIT": KeySpec("ban_rate_limit", v.RATE),
        "BAN_RATE_LIMIT_NET": KeySpec("ban_rate_limit_net", v.RATE),
        "SENSITIVE_NETWORKS": KeySpec("sensitive_networks", v.networks),
        "KEEP_CAPABILITIES": KeySpec("keep_capabilities", v.optional),
        "FLEET_REDIS_URL": KeySpec("fleet_redis_url", v.url),
        "FLEET_NAME": KeySpec("fleet_name", v.fleet_name),
        "FLEET_HOST_ID": KeySpec("fleet_host_id", v.host_id),
        "FLEET_KEY_FILE": KeySpec("fleet_key_file", v.optional_path),
        "FLEET_PASSWORD_FILE": KeySpec("fleet_password_file", v.optional_path),
        "FLEET_ACCEPT_HOSTS": KeySpec("fleet_accept_hosts", v.host_ids),
        "FLEET_BAN_RATE_LIMIT": KeySpec("fleet_ban_rate_limit", v.RATE),
    }
)

_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)
# C0 controls except tab, and DEL: 1.2 silently cut the value at the first of these.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# Lone surrogates are what undecodable bytes become under the surrogateescape handler.
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _split_line(line: str, source: str, number: int) -> tuple[str, str, str]:
    """Split `KEY = "value" trailing` into its three parts."""
    match = _KEY.match(line)
    rest = line[match.end() :].lstrip(" \t") if match else ""
    if match is None or not rest.startswith("="):
        key = match.group() if match and match.group() in KEYS else None
        shown = line if len(line) <= 40 else line[:37] + "..."
        raise ConfigError(
            source, number, key, f'expected KEY="value", a # comment or a blank line, not {shown!r}'
        )
    key = match.group()
    rest = rest[1:].lstrip(" \t")
    if not rest.startswith('"'):
        raise ConfigError(source, number, key, 'the value must be in double quotes: KEY="value"')
    end = rest.find('"', 1)
    if end < 0:
        raise ConfigError(source, number, key, "the value has no closing double quote")
    return key, rest[1:end], rest[end + 1 :]


def _check_text(value: str) -> None:
    if found := _CONTROL.search(value):
        raise v.BadValue(f"the value contains control character {ord(found.group()):#04x}")
    if _SURROGATE.search(value):
        raise v.BadValue("the value is not valid UTF-8 text")


def parse_config(text: str, source: str) -> LoadedConfig:
    """Parse configuration text; `source` names it in errors and warnings (usually the path)."""
    values: dict[str, Any] = {}
    lines: dict[str, int] = {}
    warnings: list[str] = []
    # Lines are split on \n only (not str.splitlines) so numbers match what editors show.
    for number, raw in enumerate(text.removeprefix("\ufeff").split("\n"), start=1):
        line = raw.removesuffix("\r").lstrip(" \t")
        if not line or line.startswith("#"):
            continue
        key, value, trailing = _split_line(line, source, number)
        spec = KEYS.get(key)
        if spec is None:
            hint = (
                f"; keys are upper case: did you mean {key.upper()}?" if key.upper() in KEYS else ""
            )
            warnings.append(f"{source}:{number}: unknown key {key} ignored{hint}")
            continue
        try:
            _check_text(value)
            converted = spec.convert(value)
        except v.BadValue as error:
            raise ConfigError(source, number, key, str(error)) from None
        if key in lines:
            warnings.append(
                _located(
                    source,
                    number,
                    key,
                    f"already set on line {lines[key]}; this later value is ignored "
                    "(the first one wins, as in PortSentry 1.2)",
                )
            )
        else:
            values[spec.field] = converted
            lines[key] = number
        extra = trailing.strip(" \t")
        if extra and not extra.startswith("#"):
            warnings.append(
                _located(source, number, key, f"text after the closing quote ignored: {extra!r}")
            )
    config = Config(source=source, lines=MappingProxyType(lines), **values)
    warnings.extend(_consistency_warnings(config))
    return LoadedConfig(config, tuple(warnings))


def _consistency_warnings(config: Config) -> list[str]:
    found = []
    for key in ("KILL_ROUTE", "KILL_HOSTS_DENY", "KILL_RUN_CMD", "KILL_ROUTE_UNDO"):
        command = getattr(config, KEYS[key].field)
        for mistake in v.placeholder_mistakes(command or ""):
            found.append(_located(config.source, config.line_of(key), key, mistake))
    for key, mode in (("BLOCK_TCP", config.block_tcp), ("BLOCK_UDP", config.block_udp)):
        where = (config.source, config.line_of(key), key)
        if (mode == 1 and config.kill_route is None and config.kill_hosts_deny is None
                and config.ban_backend == "none"):
            found.append(
                _located(
                    *where,
                    "is 1 (block) but neither KILL_ROUTE nor KILL_HOSTS_DENY is set; "
                    "scanners will be logged and recorded but not blocked",
                )
            )
        if mode == 2 and config.kill_run_cmd is None:
            found.append(
                _located(
                    *where,
                    "is 2 (run KILL_RUN_CMD only) but KILL_RUN_CMD is not set; "
                    "scanners will be logged and recorded but nothing will be run",
                )
            )
    return found


def load_config(path: str) -> LoadedConfig:
    """Read and parse a configuration file; an unreadable file is a ConfigError."""
    try:
        with open(path, "rb") as file:
            mode = os.fstat(file.fileno()).st_mode
            data = file.read(_MAX_FILE_BYTES + 1)
    except OSError as error:
        reason = error.strerror or str(error)
        raise ConfigError(
            path, None, None, f"cannot read the configuration file: {reason}"
        ) from None
    if len(data) > _MAX_FILE_BYTES:
        raise ConfigError(
            path, None, None, "is larger than 1 MiB; is it really a configuration file?"
        )
    # surrogateescape: stray Latin-1 bytes in comments are harmless, and parse_config rejects
    # them in values, where they would matter.
    loaded = parse_config(data.decode("utf-8", "surrogateescape"), path)
    if stat.S_ISREG(mode) and mode & stat.S_IWOTH:
        # The KILL_* commands run as root, so whoever can edit this file can run anything as root.
        warning = f"{path}: is writable by every user, who could then run commands as root"
        return LoadedConfig(loaded.config, (warning, *loaded.warnings))
    return loaded


def load_embedded_default() -> LoadedConfig:
    """The configuration shipped inside the package (also a template for /etc)."""
    from importlib import resources  # 15 ms to import; only the embedded default needs it

    text = resources.files("portsentry").joinpath("data/portsentry.conf").read_text("utf-8")
    return parse_config(text, EMBEDDED_SOURCE)


def load_effective(path: str | None, *, default_path: str = DEFAULT_CONFIG_PATH) -> LoadedConfig:
    """The configuration to run with: `path` (from -c) if given, else `default_path` if it
    exists, else the embedded default."""
    if path is not None:
        return load_config(path)
    # lexists: a dangling symlink there is a broken admin setup, worth an error, not a fallback.
    if os.path.lexists(default_path):
        return load_config(default_path)
    return load_embedded_default()
