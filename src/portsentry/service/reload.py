"""Reloading the daemon, and its sensors: re-bound when a reload changes what they are built from,
and their drop counts.

All of it runs on the main loop, between packets: `reload` when SIGHUP set its flag or a control
`reload` request was posted there, `reopen_logs` after SIGUSR1, and the counts for the tick and
the `stats` request. A new configuration that cannot be read, or whose sensors cannot open, is
refused and the old one stays in force, its sensors watching again. Part of Daemon
(service.daemon).
"""

from __future__ import annotations

import selectors
from collections.abc import Sequence

from portsentry.bans.lifecycle import BanPolicy
from portsentry.config.ignore import IgnoreSource
from portsentry.config.settings import Config, engine_settings
from portsentry.core import messages
from portsentry.core.probe import Mode
from portsentry.sensors.base import Sensor
from portsentry.service import sdnotify
from portsentry.service.admin import protected_addresses
from portsentry.service.daemon_state import SensorFactory
from portsentry.service.startup import Startup


class NothingWatched(Exception):
    """A reload's sensors opened and none of them watches anything."""


def _sensor_settings(config: Config, modes: Sequence[Mode]) -> tuple[object, ...]:
    """What the sensors of `modes` are built from: a reload re-binds them only when this changes.
    The connect modes' sockets depend on their ports alone: re-bound for nothing, they reset the
    connections waiting to be accepted, which were then never logged."""
    found: tuple[object, ...] = ()
    if Mode.TCP in modes:
        found += (config.tcp_ports,)
    if Mode.UDP in modes:
        found += (config.udp_ports,)
    if any(not mode.is_classic for mode in modes):
        found += (config.tcp_ports, config.udp_ports, config.advanced_ports_tcp, config.advanced_ports_udp,
                  config.advanced_exclude_tcp, config.advanced_exclude_udp, config.capture,
                  config.nflog_group,
                  # the first-probe ban's rules are part of the capture (service.wiring.kernel_ban_for)
                  config.kernel_ban, config.scan_trigger, config.block_tcp, config.block_udp,
                  config.block_time, config.ban_rate_limit, config.ban_rate_limit_net)
    return found


class Reloading(Startup):
    """The Daemon's reload and its sensors."""

    def reload(self) -> bool:
        """Re-read config and ignore file; a bad new config is refused and the old one stays.

        Bans, trigger counts and blocked hosts survive; sensors are re-bound only when the
        ports they watch changed.
        """
        if self.reloader is None:
            return False
        sdnotify.reloading()
        self.telemetry.reopen()  # log rotation: SIGHUP reopens the event log
        try:
            config, ignore = self.reloader()
        except Exception as error:  # ConfigError, IgnoreFileError, OSError: all keep the old config
            self.journal.log(messages.reload_rejected(str(error)))
            sdnotify.ready()
            return False
        old = self.config
        rebind = _sensor_settings(old, self.modes) != _sensor_settings(config, self.modes)
        if self.sensor_factory is not None and rebind:
            # Before anything is switched over: new sensors that cannot open (a capture refused,
            # an NFLOG group taken) refuse the reload, and the old configuration's watch again.
            try:
                self._kernel_guards_now(config, ignore)
                self._rebind(self.sensor_factory(config), need_one=True)
            except Exception as error:
                self.journal.log(messages.reload_rejected(str(error)))
                if not self.sensors:  # closed for the new ones (not when building them failed)
                    self._rebind_or_say(self.sensor_factory, old)
                sdnotify.ready()
                return False
        now = self.clock()
        self.config = config
        self.ignore = ignore
        self.engine.update_settings(engine_settings(config))
        self.engine.ignore = ignore.current(now)
        self._skip_ignored()
        self._lane_compile()
        self.responder.timeout = config.command_timeout
        if self.bans is not None:
            self.bans.policy = BanPolicy.from_config(config)
        if self.fleet is not None:
            self.fleet.set_hosts_deny(config.kill_hosts_deny)
        self.journal.history_file = config.history_file
        self.journal.move_blocked_file(config.blocked_file, list(self.modes))
        self.journal.log(messages.reloaded(config.source))
        sdnotify.ready()
        return True

    def _kernel_guards_now(self, config: Config, ignore: IgnoreSource) -> None:
        """Before a reload's new sensors may add first-probe ban rules: the guards of its
        `config` in force. With KERNEL_BAN="off" at start there was no KernelBans to push them,
        or to settle its bans. A reload refused after this is corrected by the next tick."""
        if self._kernel is None and self.bans is not None and self.bans.backend is not None \
                and config.kernel_ban != "off":
            self._kernel = self._kernel_bans(self.bans)
        if self._kernel is not None:
            self._protected = protected_addresses(config)
            self.engine.guard.set_protected(self._protected)
            self._kernel.update(self._kernel_guards(config, ignore))
            self._kernel.push()

    def reopen_logs(self) -> None:
        """After log rotation (SIGUSR1): the event log is opened again by name. The history and
        blocked files are opened for every line and need nothing; the configuration stays."""
        self.telemetry.reopen()
        self.journal.log(messages.reopened())

    def _rebind(self, sensors: Sequence[Sensor], need_one: bool = False) -> None:
        """Close the sensors and open `sensors` instead; when one cannot open, or (`need_one`)
        none of them watches anything, every one of them is closed again (none is left half
        open) and the error raised."""
        self._close_sensors()
        self.sensors = tuple(sensors)
        try:
            watching = False
            for sensor in self.sensors:
                for handle in sensor.open():
                    self._selector.register(handle, selectors.EVENT_READ, sensor)
                    watching = True
            if need_one and not watching:
                # A start shuts down here; a reload must not leave a daemon that watches nothing.
                raise NothingWatched("with it no mode watches any port (every one in use or not "
                                     "to be bound, said above)")
        except BaseException:
            self._close_sensors()
            self.sensors = ()
            raise
        self._skip_ignored()

    def _rebind_or_say(self, factory: SensorFactory, config: Config) -> None:
        try:
            self._rebind(factory(config))
        except Exception as error:
            self.journal.log(messages.config_error(
                f"cannot open the sensors again: {error}; nothing is watched until a reload succeeds"))

    def _close_sensors(self) -> None:
        self._stop_lane()
        for sensor in self.sensors:
            for key in list(self._selector.get_map().values()):
                if key.data is sensor:
                    self._selector.unregister(key.fileobj)
            sensor.close()

    def capture_drops(self) -> int | None:
        drops = [d for d in (s.capture_drops() for s in self.sensors) if d is not None]
        return sum(drops) if drops else None

    def packet_drops(self) -> dict[str, int]:
        """Packets dropped before the engine, per reason (malformed, forged, banned already)."""
        totals: dict[str, int] = {}
        for sensor in self.sensors:
            for reason, count in sensor.packet_drops().items():
                totals[reason] = totals.get(reason, 0) + count
        if self._dropped is not None and self._dropped.total:
            # Never captured: probes of banned sources the kernel dropped (NFLOG capture), as
            # the summary lines reported them.
            totals["banned_source_in_kernel"] = self._dropped.total
        return totals
