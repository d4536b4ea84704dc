"""cli.run: what a reload takes from the new configuration."""

from __future__ import annotations

from portsentry.cli.run import START_ONLY_KEYS, keep_start_only
from portsentry.config.settings import KEYS, engine_settings, parse_config

BASE = 'TCP_PORTS="1,79"\nBLOCK_TCP="1"\nKILL_ROUTE="/sbin/route add -host $TARGET$ reject"\n'


def test_a_reload_keeps_what_only_a_start_can_change_and_says_which():
    # BAN_BACKEND none -> nftables, taken as read, had the engine add a native step to every
    # block for a backend the daemon never made: those blocks failed.
    running = parse_config(BASE + 'BAN_BACKEND="none"\n', "portsentry.conf").config
    text = BASE + 'BAN_BACKEND="nftables"\nSTATE_DIR="/srv/elsewhere"\nSCAN_TRIGGER="2"\n'
    new = parse_config(text, "portsentry.conf").config
    kept, waiting = keep_start_only(running, new)
    assert waiting == ["BAN_BACKEND", "STATE_DIR"]
    assert kept.ban_backend == "none" and kept.state_dir == running.state_dir
    assert not engine_settings(kept).native_ban
    assert kept.scan_trigger == 2  # what a reload applies, applied
    assert keep_start_only(running, running) == (running, [])


def test_every_start_only_key_is_a_key():
    assert set(START_ONLY_KEYS) <= set(KEYS)
