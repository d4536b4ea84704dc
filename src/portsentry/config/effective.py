"""What a parsed Config becomes outside the parser: the settings the engine decides with, and
every effective setting written back in config-file syntax (check-config --effective)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Final

from portsentry.config import values as v
from portsentry.core.ports import format_ports

if TYPE_CHECKING:
    from portsentry.config.settings import Config
    from portsentry.core.engine import EngineSettings


def engine_settings(config: Config) -> EngineSettings:
    # Imported here: the admin commands read the configuration without the engine, and their
    # start-up is most of their wall time.
    from portsentry.core.engine import EngineSettings
    from portsentry.core.guard import GuardSettings

    """The part of the configuration the engine decides with (the engine, core, reads no config)."""
    return EngineSettings(
        scan_trigger=config.scan_trigger,
        block_tcp=config.block_tcp,
        block_udp=config.block_udp,
        kill_route=config.kill_route,
        kill_hosts_deny=config.kill_hosts_deny,
        kill_run_cmd=config.kill_run_cmd,
        kill_run_cmd_first=config.kill_run_cmd_first,
        port_banner=config.port_banner,
        native_ban=config.ban_backend != "none",
        log_repeat_limit=config.log_repeat_limit,
        log_repeat_window=config.log_repeat_window,
        guard=GuardSettings(config.ban_rate_limit, config.ban_rate_limit_net, config.sensitive_networks),
    )


def _render(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, tuple):
        if all(isinstance(item, int) for item in value):
            return format_ports(value)
        return ",".join(str(item) for item in value)
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else str(value)


_LIST_NOUNS: Final[Mapping[Callable[[str], object], str]] = {
    v.port_list: "port", v.networks: "network", v.host_ids: "host id"}


def format_effective(config: Config) -> str:
    """Every effective setting, one per line, in config-file syntax with where it came from.

    Parsing the result again gives the same settings (unset values are written as "").
    """
    # Imported here: the table (settings.py) re-exports this module's names for its callers.
    from portsentry.config.settings import KEYS

    out = [f"# Effective PortSentry configuration from {config.source}"]
    for key, spec in KEYS.items():
        value = getattr(config, spec.field)
        setting = f'{key}="{_render(value)}"'
        line = config.line_of(key)
        notes = [f"line {line}" if line is not None else "default"]
        if value is None:
            notes.append("not set")
        elif isinstance(value, int) and 0 <= value < len(spec.labels):
            notes.append(spec.labels[value])
        elif isinstance(value, tuple):
            # Named by the key's converter, not the items: an empty list of networks is no
            # "0 ports", and host ids are no networks.
            kind = _LIST_NOUNS.get(spec.convert, "item")
            notes.append(f"{len(value)} {kind}{'' if len(value) == 1 else 's'}")
        out.append(f"{setting:<48}  # {', '.join(notes)}")
    return "\n".join(out) + "\n"
