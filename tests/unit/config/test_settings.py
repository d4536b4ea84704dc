"""Tests for portsentry.config: the classic portsentry.conf parser and its loaders."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portsentry.config.settings import (
    DEFAULT_CONFIG_PATH,
    EMBEDDED_SOURCE,
    KEYS,
    Config,
    ConfigError,
    LoadedConfig,
    format_effective,
    load_config,
    load_effective,
    load_embedded_default,
    parse_config,
)
from portsentry.responders.nftables import NftablesBackend

FUZZ = settings(max_examples=int(os.environ.get("PORTSENTRY_FUZZ_EXAMPLES", "100")), deadline=None)

SRC = "test.conf"
# Two valid lines and a comment before the line under test, so line numbers are checked.
PREFIX = '# a comment\nTCP_PORTS="1,2"\n\n'
BAD_LINE = 4

CLASSIC_TCP = (
    "1,11,15,79,111,119,143,540,635,1080,1524,2000,5742,6667,12345,12346,20034,27665,"
    "31337,32771,32772,32773,32774,40421,49724,54320"
)
CLASSIC_UDP = (
    "1,7,9,69,161,162,513,635,640,641,700,37444,34555,31335,32770,32771,32772,32773,32774,"
    "31337,54321"
)


def parse(text: str) -> LoadedConfig:
    return parse_config(text, SRC)


def settings_of(config: Config) -> Config:
    """The config without where it came from, to compare settings only."""
    return dataclasses.replace(config, source="", lines={})


# --- errors ---------------------------------------------------------------------------------

ERRORS = [
    # (line, key named in the error, exact message)
    ("TCP_PORTS=1,2", "TCP_PORTS", 'the value must be in double quotes: KEY="value"'),
    ("BLOCK_TCP = 1", "BLOCK_TCP", 'the value must be in double quotes: KEY="value"'),
    ("KILL_ROUTE='x $TARGET$'", "KILL_ROUTE", 'the value must be in double quotes: KEY="value"'),
    ("UNKNOWN_KEY=1", "UNKNOWN_KEY", 'the value must be in double quotes: KEY="value"'),
    ('UDP_PORTS="1,2', "UDP_PORTS", "the value has no closing double quote"),
    ('PORT_BANNER="go away', "PORT_BANNER", "the value has no closing double quote"),
    (
        'TCP_PORTS "1,2"',
        "TCP_PORTS",
        'expected KEY="value", a # comment or a blank line, not \'TCP_PORTS "1,2"\'',
    ),
    (
        "this is junk",
        None,
        "expected KEY=\"value\", a # comment or a blank line, not 'this is junk'",
    ),
    ('"1,2"', None, 'expected KEY="value", a # comment or a blank line, not \'"1,2"\''),
    ('="1"', None, 'expected KEY="value", a # comment or a blank line, not \'="1"\''),
    ('TCP_PORTS="1,70000"', "TCP_PORTS", "'70000' is not a port (1-65535)"),
    ('UDP_PORTS="0"', "UDP_PORTS", "'0' is not a port (1-65535)"),
    ('UDP_PORTS="7,9,x"', "UDP_PORTS", "'x' is not a port number or a range like 512-515"),
    (
        'ADVANCED_EXCLUDE_TCP="139-113"',
        "ADVANCED_EXCLUDE_TCP",
        "'139-113' is not a valid range (the first port is above the last)",
    ),
    (
        'ADVANCED_EXCLUDE_UDP="67,,68"',
        "ADVANCED_EXCLUDE_UDP",
        "'' is an empty entry (two commas in a row, or a leading comma)",
    ),
    *[
        (
            f'{key}="{value}"',
            key,
            f"{value!r} is not 0 (log only), 1 (block) or 2 (run KILL_RUN_CMD only)",
        )
        for key, value in [
            ("BLOCK_TCP", "3"),
            ("BLOCK_TCP", "1x"),
            ("BLOCK_TCP", "yes"),
            ("BLOCK_TCP", ""),
            ("BLOCK_UDP", "-1"),
            ("BLOCK_UDP", "1.0"),
        ]
    ],
    *[
        (
            f'SCAN_TRIGGER="{value}"',
            "SCAN_TRIGGER",
            f"{value!r} is not a whole number of hits from 0 to 65535",
        )
        for value in ["-1", "3x", "1.5", "", "70000", "9" * 5000]
    ],
    *[
        (f'{key}="{value}"', key, f"{value!r} is not 0 or 1")
        for key, value in [
            ("RESOLVE_HOST", "2"),
            ("RESOLVE_HOST", "yes"),
            ("KILL_RUN_CMD_FIRST", "on"),
            ("KILL_RUN_CMD_FIRST", "01x"),
        ]
    ],
    *[
        (f'{key}="{value}"', key, f"{value!r} is not a number of ports from 1 to 65535")
        for key, value in [
            ("ADVANCED_PORTS_TCP", "0"),
            ("ADVANCED_PORTS_TCP", "65536"),
            ("ADVANCED_PORTS_UDP", "many"),
        ]
    ],
    *[
        (
            f'COMMAND_TIMEOUT="{value}"',
            "COMMAND_TIMEOUT",
            f"{value!r} is not a number of seconds above 0 and at most 86400",
        )
        for value in ["0", "0.0", "-1", "abc", "nan", "inf", "1e9", "1_0", "0x10", ""]
    ],
    ('KILL_ROUTE="/sbin/route add -host reject"', "KILL_ROUTE", "has no $TARGET$ to substitute"),
    ('KILL_HOSTS_DENY="ALL: $TARGET"', "KILL_HOSTS_DENY", "has no $TARGET$ to substitute"),
    ('PORT_BANNER="go\x07away"', "PORT_BANNER", "the value contains control character 0x07"),
    (
        'KILL_RUN_CMD="run\x00 $TARGET$"',
        "KILL_RUN_CMD",
        "the value contains control character 0x00",
    ),
    ('HISTORY_FILE="/var/\udcff"', "HISTORY_FILE", "the value is not valid UTF-8 text"),
    (
        'HOSTS_DENY_FILE=""',
        "HOSTS_DENY_FILE",
        "must not be empty (leave the key out to use the default)",
    ),
    # A relative path meant one file before --daemon's chdir("/") and another after it (and at
    # every reload and ignore-file re-read): refused as STATE_DIR's always was.
    *[
        (f'{key}="{value}"', key, f"{value!r} is not an absolute path")
        for key, value in [
            ("IGNORE_FILE", "portsentry.ignore"),
            ("HISTORY_FILE", "var/portsentry.history"),
            ("BLOCKED_FILE", "./portsentry.blocked"),
            ("HOSTS_DENY_FILE", "hosts.deny"),
            ("EVENT_LOG", "events.jsonl"),
            ("FLEET_KEY_FILE", "fleet.key"),
            ("FLEET_PASSWORD_FILE", "~/fleet.pass"),
            ("STATE_DIR", "state"),
        ]
    ],
]


@pytest.mark.parametrize(("line", "key", "message"), ERRORS)
def test_each_error_names_file_line_and_key(line: str, key: str | None, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(PREFIX + line + '\nUDP_PORTS="1"\n')
    error = caught.value
    assert (error.source, error.line, error.key, error.message) == (SRC, BAD_LINE, key, message)
    if key is None:
        assert str(error) == f"{SRC}:{BAD_LINE}: {message}"
    else:
        assert str(error) == f"{SRC}:{BAD_LINE}: {key}: {message}"


def test_error_text_matches_the_style_guide_example() -> None:
    text = "\n" * 16 + 'TCP_PORTS="1,70000"\n'
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "portsentry.conf")
    assert str(caught.value) == "portsentry.conf:17: TCP_PORTS: '70000' is not a port (1-65535)"
    with pytest.raises(ConfigError) as caught:
        parse_config('#\n#\nKILL_ROUTE="/sbin/route add reject"\n', "/etc/p.conf")
    assert str(caught.value) == "/etc/p.conf:3: KILL_ROUTE: has no $TARGET$ to substitute"


def test_config_error_omits_missing_parts() -> None:
    assert str(ConfigError("f", None, None, "gone")) == "f: gone"
    assert str(ConfigError("f", None, "K", "bad")) == "f: K: bad"
    assert str(ConfigError("f", 2, None, "bad")) == "f:2: bad"


def test_a_bad_duplicate_is_still_an_error() -> None:
    # 1.2 never looked at later duplicates; a broken one is still worth stopping for.
    with pytest.raises(ConfigError) as caught:
        parse('BLOCK_TCP="1"\nBLOCK_TCP="yes"\n')
    assert (caught.value.line, caught.value.key) == (2, "BLOCK_TCP")


def test_syntax_errors_count_even_for_unknown_keys() -> None:
    with pytest.raises(ConfigError) as caught:
        parse('FOO="unterminated\n')
    assert (caught.value.line, caught.value.key) == (1, "FOO")


# --- accepted syntax ------------------------------------------------------------------------


def test_classic_syntax_variants_are_accepted() -> None:
    text = (
        "\ufeff# comment\r\n"
        "\r\n"
        '   TCP_PORTS="1,7, 9,512-515"\r\n'
        '\tUDP_PORTS\t=\t"7"\r\n'
        "  # indented comment\n"
        'RESOLVE_HOST = "1 "\n'
        'BLOCK_TCP=" 2"   # trailing comment\n'
        'BLOCK_UDP="1"\n'
        'SCAN_TRIGGER="\t3\t"\n'
        'KILL_ROUTE="/sbin/route add -host $TARGET$ reject"\n'
        'KILL_HOSTS_DENY=""\n'
        'KILL_RUN_CMD="/bin/alert $TARGET$ $PORT$ $MODE$"\n'
        'KILL_RUN_CMD_FIRST="1"\n'
        'PORT_BANNER=""\n'
        'HOSTS_DENY_FILE="/tmp/hosts.deny"\n'
        'COMMAND_TIMEOUT=" 2.5 "\n'
        'ADVANCED_PORTS_TCP="2048"\n'
        'ADVANCED_EXCLUDE_UDP="520,138,137,67"\n'
        "   \t  \n"
    )
    loaded = parse(text)
    assert loaded.warnings == ()
    config = loaded.config
    assert config.source == SRC
    assert config.tcp_ports == (1, 7, 9, 512, 513, 514, 515)
    assert config.udp_ports == (7,)
    assert config.resolve_host is True
    assert (config.block_tcp, config.block_udp, config.scan_trigger) == (2, 1, 3)
    assert config.kill_route == "/sbin/route add -host $TARGET$ reject"
    assert config.kill_hosts_deny is None
    assert config.kill_run_cmd == "/bin/alert $TARGET$ $PORT$ $MODE$"
    assert config.kill_run_cmd_first is True
    assert config.port_banner is None
    assert config.hosts_deny_file == "/tmp/hosts.deny"
    assert config.command_timeout == 2.5
    assert (config.advanced_ports_tcp, config.advanced_ports_udp) == (2048, 1024)
    assert config.advanced_exclude_udp == (67, 137, 138, 520)
    assert config.line_of("TCP_PORTS") == 3
    assert config.line_of("UDP_PORTS") == 4
    assert config.line_of("COMMAND_TIMEOUT") == 16
    assert config.line_of("IGNORE_FILE") is None


def test_missing_keys_take_the_classic_defaults() -> None:
    loaded = parse("# nothing set\n")
    assert loaded.warnings == ()
    assert settings_of(loaded.config) == settings_of(Config(source=SRC))
    config = loaded.config
    assert (config.advanced_ports_tcp, config.advanced_ports_udp) == (1024, 1024)
    assert (config.block_tcp, config.block_udp, config.scan_trigger) == (0, 0, 0)
    assert config.hosts_deny_file == "/etc/hosts.deny"
    assert config.command_timeout == 30.0
    assert config.lines == {}


def test_values_keep_inner_spaces_tabs_and_hashes() -> None:
    config = parse('PORT_BANNER="  # no\tentry  "\nIGNORE_FILE="/etc/a b"\n').config
    assert config.port_banner == "  # no\tentry  "
    assert config.ignore_file == "/etc/a b"


def test_empty_port_lists_are_allowed() -> None:
    config = parse('TCP_PORTS=""\nUDP_PORTS=" "\n').config
    assert (config.tcp_ports, config.udp_ports) == ((), ())


def test_config_error_helper_blames_the_line_a_key_was_set_on() -> None:
    config = parse('\n\nTCP_PORTS="1"\n').config
    error = config.error("TCP_PORTS", "port 1 is in use")
    assert str(error) == f"{SRC}:3: TCP_PORTS: port 1 is in use"
    assert str(config.error("UDP_PORTS", "needed for -udp")) == f"{SRC}: UDP_PORTS: needed for -udp"


def test_config_is_frozen_and_hashable() -> None:
    config = parse('TCP_PORTS="1"\n').config
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.block_tcp = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.lines["X"] = 1  # type: ignore[index]
    assert hash(config) == hash(dataclasses.replace(config))


def test_key_table_covers_exactly_the_config_fields() -> None:
    fields = {f.name for f in dataclasses.fields(Config)} - {"source", "lines"}
    assert {spec.field for spec in KEYS.values()} == fields
    assert len(KEYS) == len(fields)
    for key, spec in KEYS.items():
        assert key == spec.field.upper()


# --- warnings -------------------------------------------------------------------------------


def test_unknown_key_is_a_warning() -> None:
    loaded = parse('TCP_PORTS="1"\nFOO="bar"\nSENTRY_MODE="stcp"\n')
    assert loaded.warnings == (
        f"{SRC}:2: unknown key FOO ignored",
        f"{SRC}:3: unknown key SENTRY_MODE ignored",
    )
    assert loaded.config.tcp_ports == (1,)


def test_lower_case_key_warning_suggests_the_real_key() -> None:
    loaded = parse('tcp_ports="1"\n')
    assert loaded.warnings == (
        f"{SRC}:1: unknown key tcp_ports ignored; keys are upper case: did you mean TCP_PORTS?",
    )
    assert loaded.config.tcp_ports == ()


def test_duplicate_key_first_wins_with_a_warning() -> None:
    loaded = parse('SCAN_TRIGGER="2"\n#\nSCAN_TRIGGER="5"\nSCAN_TRIGGER="7"\n')
    assert loaded.config.scan_trigger == 2
    assert loaded.config.line_of("SCAN_TRIGGER") == 1
    assert loaded.warnings == tuple(
        f"{SRC}:{line}: SCAN_TRIGGER: already set on line 1; this later value is ignored "
        "(the first one wins, as in PortSentry 1.2)"
        for line in (3, 4)
    )


def test_text_after_the_closing_quote_is_ignored_with_a_warning() -> None:
    loaded = parse('TCP_PORTS="1,2",3\nUDP_PORTS="7" # fine\nRESOLVE_HOST="0"  \n')
    assert loaded.config.tcp_ports == (1, 2)
    assert loaded.config.udp_ports == (7,)
    assert loaded.warnings == (f"{SRC}:1: TCP_PORTS: text after the closing quote ignored: ',3'",)


@pytest.mark.parametrize("protocol", ["TCP", "UDP"])
def test_blocking_without_a_block_command_warns(protocol: str) -> None:
    loaded = parse(f'\nBLOCK_{protocol}="1"\n')
    assert loaded.warnings == (
        f"{SRC}:2: BLOCK_{protocol}: is 1 (block) but neither KILL_ROUTE nor KILL_HOSTS_DENY "
        "is set; scanners will be logged and recorded but not blocked",
    )
    # An empty value means unset, so it does not count as a block command.
    assert parse(f'BLOCK_{protocol}="1"\nKILL_ROUTE=""\n').warnings != ()
    assert parse(f'BLOCK_{protocol}="1"\nKILL_ROUTE="drop $TARGET$"\n').warnings == ()
    assert parse(f'BLOCK_{protocol}="1"\nKILL_HOSTS_DENY="ALL: $TARGET$"\n').warnings == ()
    # issue 9.8: a native ban backend blocks, so there is nothing to warn about.
    assert parse(f'BLOCK_{protocol}="1"\nBAN_BACKEND="nftables"\n').warnings == ()
    assert parse(f'BLOCK_{protocol}="1"\nBAN_BACKEND="auto"\n').warnings == ()


def test_a_misspelt_placeholder_in_a_kill_command_is_a_warning_naming_file_line_and_key() -> None:
    # It ran with the text as written: KILL_RUN_CMD paged "$TAGRET$ scanned", hosts.deny got
    # "ALL: 198.18.0.2 : $TAGRET$", and not a word at check-config, start or reload.
    loaded = parse('TCP_PORTS="1"\n'
                   'KILL_ROUTE="/sbin/ip route add blackhole $TARGET$ # port $PORT"\n'
                   'KILL_HOSTS_DENY="ALL: $TARGET$ : $TAGRET$"\n'
                   'KILL_RUN_CMD="/bin/page $target$ on $prot$ by MODE$"\n'
                   'KILL_ROUTE_UNDO="/sbin/ip route del blackhole $TARGET$ $TARGET"\n')
    assert loaded.warnings == (
        f"{SRC}:2: KILL_ROUTE: '$PORT' has no closing $: it is left as written, not replaced "
        "(placeholders: $TARGET$, $PORT$, $MODE$)",
        f"{SRC}:3: KILL_HOSTS_DENY: '$TAGRET$' is not a placeholder (did you mean $TARGET$?): it "
        "is left as written, not replaced",
        f"{SRC}:4: KILL_RUN_CMD: '$target$' is not a placeholder (did you mean $TARGET$?): it is "
        "left as written, not replaced",
        f"{SRC}:4: KILL_RUN_CMD: '$prot$' is not a placeholder (did you mean $PORT$?): it is left "
        "as written, not replaced",
        f"{SRC}:4: KILL_RUN_CMD: 'MODE$' has no opening $: it is left as written, not replaced "
        "(placeholders: $TARGET$, $PORT$, $MODE$)",
        f"{SRC}:5: KILL_ROUTE_UNDO: '$TARGET' has no closing $: it is left as written, not "
        "replaced (placeholders: $TARGET$, $PORT$, $MODE$)",
    )
    assert loaded.config.kill_hosts_deny == "ALL: $TARGET$ : $TAGRET$"  # warned, not refused


@pytest.mark.parametrize("command", [
    "/sbin/route add -host $TARGET$ reject",
    "/sbin/iptables -I INPUT -s $TARGET$ -j DROP && logger $MODE$ $PORT$",
    "/usr/local/bin/page '$TARGET$ on $PORT$' $HOME $1 $(date +%s) ${PATH} $? $$",
    "echo $TARGET$$PORT$$MODE$ $HOME$PATH",
])
def test_good_placeholders_and_shell_words_are_not_warned_about(command: str) -> None:
    assert parse(f'KILL_ROUTE="{command}"\nKILL_RUN_CMD="{command}"\n').warnings == ()


@pytest.mark.parametrize("protocol", ["TCP", "UDP"])
def test_run_command_only_without_a_command_warns(protocol: str) -> None:
    loaded = parse(f'BLOCK_{protocol}="2"\nKILL_ROUTE="drop $TARGET$"\n')
    assert loaded.warnings == (
        f"{SRC}:1: BLOCK_{protocol}: is 2 (run KILL_RUN_CMD only) but KILL_RUN_CMD is not set; "
        "scanners will be logged and recorded but nothing will be run",
    )
    assert parse(f'BLOCK_{protocol}="2"\nKILL_RUN_CMD="/bin/page"\n').warnings == ()


def test_log_only_needs_no_commands() -> None:
    assert parse('BLOCK_TCP="0"\nBLOCK_UDP="0"\n').warnings == ()


# --- loading files --------------------------------------------------------------------------


def test_load_config_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "portsentry.conf"
    path.write_bytes(b'# caf\xe9 in Latin-1 is fine in a comment\r\nTCP_PORTS="1, 2"\r\n')
    loaded = load_config(str(path))
    assert loaded.config.source == str(path)
    assert loaded.config.tcp_ports == (1, 2)
    assert loaded.config.line_of("TCP_PORTS") == 2
    assert loaded.warnings == ()


def test_load_config_rejects_undecodable_values(tmp_path: Path) -> None:
    path = tmp_path / "portsentry.conf"
    path.write_bytes(b'\nPORT_BANNER="caf\xe9"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert str(caught.value) == f"{path}:2: PORT_BANNER: the value is not valid UTF-8 text"


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.conf"
    with pytest.raises(ConfigError) as caught:
        load_config(str(missing))
    assert (caught.value.source, caught.value.line, caught.value.key) == (str(missing), None, None)
    assert str(caught.value) == (
        f"{missing}: cannot read the configuration file: No such file or directory"
    )
    with pytest.raises(ConfigError, match="cannot read the configuration file: Is a directory"):
        load_config(str(tmp_path))


def test_huge_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.conf"
    path.write_bytes(b"#" * (1024 * 1024 + 1))
    with pytest.raises(ConfigError, match="larger than 1 MiB"):
        load_config(str(path))


def test_world_writable_file_warns(tmp_path: Path) -> None:
    path = tmp_path / "portsentry.conf"
    path.write_text('TCP_PORTS="1"\nFOO="x"\n')
    path.chmod(0o666)
    warnings = load_config(str(path)).warnings
    assert warnings == (
        f"{path}: is writable by every user, who could then run commands as root",
        f"{path}:2: unknown key FOO ignored",
    )
    path.chmod(0o644)
    assert load_config(str(path)).warnings == (f"{path}:2: unknown key FOO ignored",)


def test_load_effective_prefers_the_given_path(tmp_path: Path) -> None:
    given_path = tmp_path / "given.conf"
    given_path.write_text('SCAN_TRIGGER="4"\n')
    default = tmp_path / "default.conf"
    default.write_text('SCAN_TRIGGER="5"\n')
    assert load_effective(str(given_path), default_path=str(default)).config.scan_trigger == 4
    assert load_effective(None, default_path=str(default)).config.scan_trigger == 5
    with pytest.raises(ConfigError):
        load_effective(str(tmp_path / "missing.conf"), default_path=str(default))


def test_load_effective_falls_back_to_the_embedded_default(tmp_path: Path) -> None:
    loaded = load_effective(None, default_path=str(tmp_path / "absent.conf"))
    assert loaded == load_embedded_default()
    assert loaded.config.source == EMBEDDED_SOURCE


def test_load_effective_does_not_hide_a_dangling_symlink(tmp_path: Path) -> None:
    link = tmp_path / "portsentry.conf"
    link.symlink_to(tmp_path / "gone.conf")
    with pytest.raises(ConfigError, match="cannot read"):
        load_effective(None, default_path=str(link))


def test_default_config_path() -> None:
    assert DEFAULT_CONFIG_PATH == "/etc/portsentry/portsentry.conf"


# --- the embedded default -------------------------------------------------------------------


def test_embedded_default_loads_without_warnings() -> None:
    loaded = load_embedded_default()
    assert loaded.warnings == ()
    config = loaded.config
    assert config.source == "<embedded default>"
    assert config.tcp_ports == tuple(sorted(set(map(int, CLASSIC_TCP.split(",")))))
    assert config.udp_ports == tuple(sorted(set(map(int, CLASSIC_UDP.split(",")))))
    assert (config.advanced_ports_tcp, config.advanced_ports_udp) == (1024, 1024)
    assert config.advanced_exclude_tcp == (113, 139)
    assert config.advanced_exclude_udp == (67, 137, 138, 520)
    assert config.ignore_file is None
    assert config.history_file == "/var/lib/portsentry/portsentry.history"
    assert config.blocked_file == "/var/lib/portsentry/portsentry.blocked"
    assert config.resolve_host is False
    assert (config.block_tcp, config.block_udp) == (1, 0)
    assert config.kill_hosts_deny == "ALL: $TARGET$"
    assert config.kill_route is None
    assert (config.ban_backend, config.block_time) == ("auto", 3600)
    assert config.kill_run_cmd is None
    assert config.scan_trigger == 0
    assert config.port_banner is None


def test_embedded_default_commented_examples_are_valid() -> None:
    # Every commented-out KEY="..." example must work when an admin uncomments it, without a
    # warning at every start: a note after the value was "text after the closing quote ignored".
    text = load_embedded_default_text()
    examples = [
        line[1:]
        for line in text.splitlines()
        if line.startswith("#") and line[1:2].isupper() and "=" in line
    ]
    assert len(examples) >= 15
    for example in examples:
        loaded = parse(example + "\n")
        assert loaded.warnings == (), example


def load_embedded_default_text() -> str:
    from importlib import resources

    return resources.files("portsentry").joinpath("data/portsentry.conf").read_text("utf-8")


def test_embedded_default_is_tidy() -> None:
    text = load_embedded_default_text()
    assert text.endswith("\n")
    assert "\t" not in text
    assert "psionic" not in text


# --- format_effective -----------------------------------------------------------------------


def test_format_effective_lists_every_key_and_where_it_came_from() -> None:
    config = parse(
        '\nBLOCK_UDP="2"\nKILL_RUN_CMD="/bin/page $TARGET$"\nTCP_PORTS="3,1,2,9"\n'
    ).config
    listing = format_effective(config)
    lines = listing.splitlines()
    assert lines[0] == f"# Effective PortSentry configuration from {SRC}"
    assert len(lines) == 1 + len(KEYS)
    assert [line.split("=", 1)[0] for line in lines[1:]] == list(KEYS)
    by_key = {line.split("=", 1)[0]: line for line in lines[1:]}
    assert by_key["TCP_PORTS"].startswith('TCP_PORTS="1-3,9"')
    assert by_key["TCP_PORTS"].endswith("# line 4, 4 ports")
    assert by_key["BLOCK_UDP"].endswith("# line 2, run KILL_RUN_CMD only")
    assert by_key["BLOCK_TCP"].endswith("# default, log only")
    assert by_key["KILL_ROUTE"] == 'KILL_ROUTE=""'.ljust(48) + "  # default, not set"
    assert by_key["COMMAND_TIMEOUT"].startswith('COMMAND_TIMEOUT="30.0"')
    assert by_key["UDP_PORTS"].endswith("# default, 0 ports")


def test_effective_listing_counts_networks_and_host_ids_as_what_they_are():
    # check-config printed SENSITIVE_NETWORKS="" and FLEET_ACCEPT_HOSTS="" as "0 ports", and
    # host ids as "networks".
    by_key = {line.split("=", 1)[0]: line for line in format_effective(Config(source=SRC)).splitlines()}
    assert by_key["SENSITIVE_NETWORKS"].endswith("# default, 0 networks")
    assert by_key["FLEET_ACCEPT_HOSTS"].endswith("# default, 0 host ids")
    config = parse('SENSITIVE_NETWORKS="198.18.0.0/24"\nFLEET_ACCEPT_HOSTS="h1 h2"\n').config
    by_key = {line.split("=", 1)[0]: line for line in format_effective(config).splitlines()}
    assert by_key["SENSITIVE_NETWORKS"].endswith("# line 1, 1 network")
    assert by_key["FLEET_ACCEPT_HOSTS"].endswith("# line 2, 2 host ids")


def _round_trip(config: Config) -> None:
    again = parse_config(format_effective(config), "again")
    assert settings_of(again.config) == settings_of(config)


def test_format_effective_round_trips_the_embedded_default() -> None:
    _round_trip(load_embedded_default().config)


def test_format_effective_round_trips_a_custom_config() -> None:
    _round_trip(
        parse(
            'TCP_PORTS="1-1000"\nRESOLVE_HOST="1"\nCOMMAND_TIMEOUT="0.25"\n'
            'KILL_RUN_CMD_FIRST="1"\nPORT_BANNER="hi there"\nSCAN_TRIGGER="65535"\n'
        ).config
    )


# --- fuzzing --------------------------------------------------------------------------------


def _check_outcome(text: str) -> None:
    try:
        loaded = parse_config(text, SRC)
    except ConfigError as error:
        assert str(error).startswith(f"{SRC}:")
        assert error.line is not None and 1 <= error.line <= text.count("\n") + 1
        return
    assert all(isinstance(w, str) and w.startswith(f"{SRC}:") for w in loaded.warnings)
    _round_trip(loaded.config)


@FUZZ
@given(st.text())
def test_parse_config_only_raises_config_error_on_arbitrary_text(text: str) -> None:
    _check_outcome(text)


@FUZZ
@given(st.binary())
def test_parse_config_only_raises_config_error_on_arbitrary_bytes(data: bytes) -> None:
    # What load_config does with the file's bytes.
    _check_outcome(data.decode("utf-8", "surrogateescape"))


_VALUES = st.one_of(
    st.sampled_from(["0", "1", "2", " 1 ", "1x", "", "70000", "1,2", "512-515", "$TARGET$", "2.5"]),
    st.text(alphabet='0123456789,- \t"$TARGETx#=\r', max_size=20),
    st.text(max_size=10),
)
_LINES = st.one_of(
    st.builds(
        lambda key, sep, value, tail: f'{key}{sep}"{value}"{tail}',
        st.sampled_from([*KEYS, "FOO", "tcp_ports"]),
        st.sampled_from(["=", " = ", "\t=", "= "]),
        _VALUES,
        st.sampled_from(["", " ", "# c", "x", '"']),
    ),
    st.sampled_from(["", "# comment", "  ", "junk", "KEY", '"', "BLOCK_TCP=1"]),
)


@FUZZ
@given(st.lists(_LINES, max_size=12), st.sampled_from(["\n", "\r\n"]))
def test_parse_config_only_raises_config_error_on_config_like_text(
    lines: list[str], newline: str
) -> None:
    _check_outcome(newline.join(lines))


# --- values at the edge of their ranges -------------------------------------------------------


def test_a_port_too_long_for_int_in_metrics_listen_is_a_config_error() -> None:
    # int() refuses strings over 4300 digits with a ValueError, which escaped as a traceback.
    port = "9" * 5000
    with pytest.raises(ConfigError) as caught:
        parse(f'\nMETRICS_LISTEN="127.0.0.1:{port}"\n')
    assert (caught.value.line, caught.value.key) == (2, "METRICS_LISTEN")
    assert "is not a port (0-65535)" in caught.value.message
    zeros = parse(f'METRICS_LISTEN="127.0.0.1:{"0" * 5000}9470"\n').config
    assert zeros.metrics_listen is not None


# Digit runs of every length up to past int()'s 4300-digit limit, not just the short ones
# st.text() favours.
_DIGIT_RUNS = st.integers(0, 6000).flatmap(lambda n: st.text("0123456789", min_size=n, max_size=n))


@FUZZ
@given(st.sampled_from(["127.0.0.1", "[::1]", "localhost", ""]), _DIGIT_RUNS)
def test_metrics_listen_with_any_digit_run_is_accepted_or_a_config_error(host: str, port: str) -> None:
    address = f"{host}:{port}"
    try:
        config = parse(f'METRICS_LISTEN="{address}"\n').config
    except ConfigError as error:
        assert error.key == "METRICS_LISTEN"
        return
    assert config.metrics_listen == address


@pytest.mark.parametrize(
    ("line", "field", "expected"),
    [
        # The top of HISTORY_MAX_ROWS's range has ten digits; a nine-digit cap refused it.
        ('HISTORY_MAX_ROWS="1000000000"', "history_max_rows", 1_000_000_000),
        # atoi read leading zeros; they do not make a number larger.
        ('SCAN_TRIGGER="0000000000003"', "scan_trigger", 3),
        ('BLOCK_TIME="0315360000"', "block_time", 315_360_000),
    ],
)
def test_whole_numbers_are_judged_by_value_not_by_digit_count(line: str, field: str, expected: int) -> None:
    assert getattr(parse(line + "\n").config, field) == expected


@pytest.mark.parametrize("url", ["redis://:s3cret@[fd00::1:6379", "redis://:s3cret@fd00::1]:6379/0"])
def test_a_redis_url_urlsplit_refuses_is_a_config_error_that_keeps_the_password_out(url: str) -> None:
    # The fleet's urlsplit() raised ValueError at start: a traceback after check-config said OK.
    with pytest.raises(ConfigError) as caught:
        parse(f'\n\nFLEET_REDIS_URL="{url}"\n')
    assert (caught.value.line, caught.value.key) == (3, "FLEET_REDIS_URL")
    assert "s3cret" not in str(caught.value)
    assert "brackets" in caught.value.message


@pytest.mark.parametrize("table", ["ps-old", "_portsentry", "a" * 33, "1table", "ps.old"])
def test_an_nft_table_name_nftables_refuses_is_a_config_error_not_a_start_that_dies(table: str) -> None:
    # check-config said "configuration OK" for NFT_TABLE="ps-old", and the start then died in a
    # ValueError traceback from the nftables backend (as did flush, block and list).
    with pytest.raises(ConfigError) as caught:
        parse(PREFIX + f'NFT_TABLE="{table}"\nUDP_PORTS="1"\n')
    assert (caught.value.line, caught.value.key) == (BAD_LINE, "NFT_TABLE")
    assert "is not an nftables table name" in caught.value.message


@given(st.from_regex(r"[A-Za-z_][A-Za-z0-9_.-]{0,32}", fullmatch=True))
@FUZZ
def test_every_nft_table_the_configuration_takes_the_backend_takes(table: str) -> None:
    try:
        config = parse(PREFIX + f'NFT_TABLE="{table}"\nUDP_PORTS="1"\n').config
    except ConfigError:
        return
    assert NftablesBackend(table=config.nft_table).table == table
