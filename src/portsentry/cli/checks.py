"""The configuration checks check-config, a start and a reload share (beyond the key table's):
the modes' required keys, KEEP_CAPABILITIES, the ignore list with this host's addresses, the
fleet's settings, and the keys a reload leaves as they were at the start. A start runs them in
the main thread before the daemon's threads exist; a reload runs them in the daemon's main loop.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from portsentry.config.ignore import IgnoreFileError, IgnoreSource
from portsentry.config.ignore import open_ignore as load_ignore_source
from portsentry.config.settings import KEYS, Config, ConfigError, LoadedConfig, format_effective
from portsentry.core.probe import Mode
from portsentry.host import privileges
from portsentry.host.info import local_addresses

if TYPE_CHECKING:
    from portsentry.fleet.settings import FleetSettings


def check_config(loaded: LoadedConfig, modes: Sequence[Mode], modes_from: str = "command line") -> int:
    try:
        validate_for_modes(loaded.config, modes)
        source = open_ignore(loaded.config)
        # Only the start reads the fleet's settings (reload keeps the fleet it has), but a
        # check-config that passes what the start refuses is no check.
        checked_fleet_settings(loaded.config)
    except (ConfigError, IgnoreFileError) as error:
        print(f"portsentry: {error}", file=sys.stderr)
        return 1
    for warning in source.warnings:
        print(f"portsentry: warning: {warning}", file=sys.stderr)
    print(format_effective(loaded.config))
    print(f"ignore list: {len(source.current(time.time()))} entries (host addresses included)")
    if modes:  # init scripts show this line rather than work the modes out themselves
        print(f"modes: {' '.join(f'-{mode}' for mode in modes)} ({modes_from})")
    print("configuration OK")
    return 0


def validate_for_modes(config: Config, modes: Sequence[Mode]) -> None:
    # Checked here rather than by the key table so that check-config, start and reload all refuse it.
    try:
        privileges.parse_keep(config.keep_capabilities)
    except ValueError as error:
        raise config.error("KEEP_CAPABILITIES", str(error)) from None
    for mode in modes:
        if mode in (Mode.TCP, Mode.STCP) and not config.tcp_ports:
            raise config.error("TCP_PORTS", f"is required by -{mode} but is not set")
        if mode in (Mode.UDP, Mode.SUDP) and not config.udp_ports:
            raise config.error("UDP_PORTS", f"is required by -{mode} but is not set")


def open_ignore(config: Config) -> IgnoreSource:
    """The ignore list in force, with this host's addresses (config.ignore.open_ignore)."""
    return load_ignore_source(config, local_addresses)


# What a reload cannot change: capabilities dropped for good, the ban backend (its nftables table,
# hook, priority and set size) and the fleet link built at start, the state directory, sockets and
# files opened then (hosts.deny: the lines of bans in force are in the old one), the resolver made
# or not.
START_ONLY_KEYS = ("KEEP_CAPABILITIES", "BAN_BACKEND", "NFT_TABLE", "NFT_HOOK", "NFT_PRIORITY",
                   "BAN_SET_SIZE", "HOSTS_DENY_FILE", "STATE_DIR", "CONTROL_SOCKET", "EVENT_LOG",
                   "METRICS_LISTEN", "RESOLVE_HOST", "FLEET_REDIS_URL", "FLEET_NAME", "FLEET_HOST_ID",
                   "FLEET_KEY_FILE", "FLEET_PASSWORD_FILE", "FLEET_ACCEPT_HOSTS", "FLEET_BAN_RATE_LIMIT")


def keep_start_only(running: Config, new: Config) -> tuple[Config, list[str]]:
    """`new` with the running values of START_ONLY_KEYS, and the keys whose value it changed.
    Taken as read, a new BAN_BACKEND had the engine ask for native bans of a backend never made
    (every such block failed), and status show settings that were not in force."""
    fields = {key: KEYS[key].field for key in START_ONLY_KEYS}
    waiting = [key for key, name in fields.items() if getattr(new, name) != getattr(running, name)]
    kept = dataclasses.replace(new, **{fields[key]: getattr(running, fields[key]) for key in waiting})
    return kept, waiting


def checked_fleet_settings(config: Config) -> FleetSettings | None:
    """The fleet's settings (None: no fleet); ConfigError when they are unusable or the redis
    package is missing."""
    from portsentry.fleet.settings import fleet_settings

    settings = fleet_settings(config)
    if settings is None:
        return None
    try:
        import redis  # noqa: F401  (the optional dependency, checked before the daemon starts)
    except ImportError:
        raise config.error("FLEET_REDIS_URL", "the fleet needs the redis package: "
                           "pip install 'portsentry[fleet]'") from None
    return settings
