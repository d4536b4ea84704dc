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


def test_what_the_ban_backend_and_hosts_deny_were_built_with_waits_for_the_next_start():
    # The nftables backend (its table, hook, priority and set size) and hosts.deny's file are
    # made once, at start: a reload took the new values as read, so status and check-config
    # showed a table, a hook or a file the daemon never used, and no line said so.
    running = parse_config(BASE + 'BAN_BACKEND="nftables"\n', "portsentry.conf").config
    new = parse_config(BASE + 'BAN_BACKEND="nftables"\nNFT_TABLE="other"\nNFT_HOOK="forward"\n'
                       'NFT_PRIORITY="5"\nBAN_SET_SIZE="1000"\nHOSTS_DENY_FILE="/srv/hosts.deny"\n',
                       "portsentry.conf").config
    kept, waiting = keep_start_only(running, new)
    assert sorted(waiting) == ["BAN_SET_SIZE", "HOSTS_DENY_FILE", "NFT_HOOK", "NFT_PRIORITY", "NFT_TABLE"]
    assert (kept.nft_table, kept.nft_hook, kept.nft_priority, kept.ban_set_size, kept.hosts_deny_file) == (
        "portsentry", "input", -10, 262144, "/etc/hosts.deny")


def test_docs_service_md_names_every_key_a_reload_leaves_to_the_next_start():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[3] / "docs" / "service.md").read_text()
    listed = re.search(r"changed: it\s+takes effect at the next start`\): (.*?)\. The", text, re.S)
    assert listed is not None
    named = set(re.findall(r"[A-Z][A-Z_]+", listed.group(1)))
    expected = {key for key in START_ONLY_KEYS if not key.startswith("FLEET_")} | {"FLEET_"}
    assert named == expected
