"""Starting the daemon, and the start's state as the main loop keeps it current.

`open` runs on the main thread before its loop (cli.run): the capture chains of the table a
previous run left go, the kernel's guards are pushed before the sensors add their ban rules, the
sensors and the control socket open, the stored bans are restored (then that table goes), and the
responders, the maintenance thread and the fleet start. What must be spared is asked later on
the main loop (`_kernel_guards`, `_fleet_guards`, `_skip_ignored`) and on an admin worker
(`spared`), which reads only sets the main loop replaces whole. Part of Daemon (service.daemon).
"""

from __future__ import annotations

import os
import selectors
import threading

from portsentry.bans.previous import TABLE_FILE, quiet_previous_table, retire_previous_table
from portsentry.bans.restore import RERUN_CONCURRENCY, rerun_routes, restore_bans
from portsentry.config.ignore import IgnoreSource
from portsentry.config.settings import Config
from portsentry.core import messages
from portsentry.core.addresses import possible_networks
from portsentry.core.probe import IPAddress, Mode
from portsentry.fleet.gate import Guards as FleetGuards
from portsentry.host import info as hostinfo
from portsentry.responders.substitute import hosts_deny_entry
from portsentry.service.admin import Spared, protected_addresses
from portsentry.service.daemon_state import DaemonState
from portsentry.service.kernelbans import Guards, guards_of
from portsentry.service.lane_replay import replay


class Startup(DaemonState):
    """The Daemon's start and the guards it keeps."""

    def _kernel_guards(self, config: Config | None = None, ignore: IgnoreSource | None = None) -> Guards:
        """Main loop: what the kernel's first-probe ban must spare, as of now (under `config`
        and `ignore` when a reload is about to put them in force)."""
        try:
            broadcasts = hostinfo.broadcast_addresses()
        except OSError:
            broadcasts = frozenset()
        return guards_of((ignore or self.ignore).current(self.clock()).networks, self._protected,
                         (config or self.config).sensitive_networks, broadcasts)

    def _skip_ignored(self) -> None:
        """Main loop, at start and once a second: the sensors may keep the ignore list's
        packets from us in the kernel, unless verbose logging wants a line for each of them."""
        # Loopback and the other impossible sources stay visible: on the wire they are forged,
        # and the parser's guard counts them (packets_dropped) before any ignore list.
        ignored = self.ignore.current(self.clock()).networks
        networks = () if self.journal.verbose else possible_networks(ignored)
        for sensor in self.sensors:
            sensor.skip_sources(networks)

    def open(self) -> bool:
        """Start every sensor; False when none could watch anything (1.2 then shuts down)."""
        any_open = False
        if self.bans is not None:
            # Before the sensors: the old table's capture chain logs to the same NFLOG group. Its
            # bans stay until this run's restore has put the stored ones in (bans.previous).
            quiet_previous_table(self.bans.backend, os.path.join(self.config.state_dir, TABLE_FILE),
                                 self.journal.log)
        self._protected = protected_addresses(self.config)
        if self._kernel is not None:
            # Before the sensors add the ban rules: from their first packet, the guards hold.
            self._kernel.update(self._kernel_guards())
            self._kernel.push()
        for sensor in self.sensors:
            for handle in sensor.open():
                self._selector.register(handle, selectors.EVENT_READ, sensor)
                any_open = True
        self._skip_ignored()
        self._selector.register(self._wake_read, selectors.EVENT_READ, None)
        if self.control is not None:
            try:
                self.control.start()
            except OSError as error:
                self.journal.log(messages.config_error(
                    f"cannot open the control socket {self.control.path}: {error}"))
                self.control = None
        self.journal.start_session(list(self.modes))
        self.engine.guard.set_protected(protected_addresses(self.config))
        cursor = 0
        if self.bans is not None:
            # The cursor first: what changes while restoring is replayed, which is harmless.
            cursor = self.bans.store.last_change()
            # Before restore lifts what expired: a ban made while the daemon was down is said first.
            self._maintenance.report_others()
            # Bans the fast lane began that the last run did not live to record: recorded, with
            # their history lines, before the restore (service.lane_replay).
            for probe, at in replay(self.lane.path, self.bans, self._hosts_deny_line, self.journal.log):
                self.journal.record(probe, at)
            restored = restore_bans(self.bans, self.clock(), os.path.join(self.config.state_dir, "kernel-id"),
                                    self._stop_path())
            self._restored = True
            retire_previous_table(self.bans.backend, os.path.join(self.config.state_dir, TABLE_FILE),
                                  self.journal.log)
            self.engine.sync_bans(restored.banned)
            self.active_bans = len(restored.banned)
            if restored.rerun:  # after READY, a few at a time: many bans must not delay the start
                self._reruns = threading.Thread(target=rerun_routes, name="route-rerun", daemon=True,
                                                args=(self.bans, restored, RERUN_CONCURRENCY,
                                                      self._stop_reruns))
                self._reruns.start()
        self._blocks.start()
        self._lane_compile()  # after the restore: the lane starts knowing every ban
        self._maintenance.start(cursor, self.active_bans)
        if self.fleet is not None:
            self.fleet.start(self._fleet_guards())
        return any_open

    def _hosts_deny_line(self, address: IPAddress, port: int, mode: Mode) -> str | None:
        template = self.config.kill_hosts_deny
        return hosts_deny_entry(template, address, port, mode) if template else None

    def _stop_path(self) -> str:
        return os.path.join(self.config.state_dir, "kernel-sync")

    def _fleet_guards(self) -> FleetGuards:
        """Main loop: what a fleet peer's ban must spare here, as of now."""
        try:
            own, broadcasts = hostinfo.local_addresses(), hostinfo.broadcast_addresses()
        except OSError:
            own, broadcasts = frozenset(), frozenset()
        return FleetGuards(own, self.engine.ignore, self._protected, frozenset(broadcasts))

    def spared(self) -> Spared:
        """What a ban by hand must spare now (an admin worker asks; both sets are replaced whole
        by the main loop, never changed in place)."""
        try:
            own = hostinfo.local_addresses()
        except OSError:
            own = frozenset()  # the ignore list in force holds them as last read
        return Spared(own, self.engine.ignore, self._protected)

    def feed_position(self) -> int:
        """The newest change of the ban store's feed the maintenance thread has read (up to a
        round behind): for the main loop, which must not wait for the store's lock."""
        return self._maintenance.cursor
