"""The JSON-lines event log: events from the builders match docs/events.schema.json (checked by a
small validator for the schema keywords we use), lines survive rotation, and the engine's
decisions (Engine.observe's Outcome) are the schema's."""

from __future__ import annotations

import json
import os
import re
import threading
from ipaddress import ip_address
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portsentry.core.actions import Decision
from portsentry.core.engine import Engine, EngineSettings
from portsentry.core.probe import KIND_CONNECT, KIND_SYN, KIND_UDP, Mode, Probe
from portsentry.journal import events

SCHEMA_PATH = Path(__file__).resolve().parents[3] / "docs" / "events.schema.json"
SCHEMA = json.loads(SCHEMA_PATH.read_text())
NOW = 1714566896.789  # 2024-05-01T12:34:56.789Z

# ---------------------------------------------------------------------------------------------
# A validator for the subset of JSON Schema that events.schema.json uses.

KNOWN_KEYWORDS = {"$schema", "$id", "title", "description", "type", "additionalProperties",
                  "required", "properties", "pattern", "enum", "const", "minLength", "minimum",
                  "maximum", "allOf", "if", "then", "items"}


def _type_ok(value: object, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return {
        "string": isinstance(value, str),
        "object": isinstance(value, dict),
        "null": value is None,
        "boolean": isinstance(value, bool),
        "array": isinstance(value, list),
    }[name]


def errors(value: object, schema: dict[str, object], where: str = "$") -> list[str]:
    unknown = set(schema) - KNOWN_KEYWORDS
    assert not unknown, f"validator does not support {unknown}"
    found: list[str] = []
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_type_ok(value, str(t)) for t in types):
            return [f"{where}: {value!r} is not of type {types}"]
    if "enum" in schema and value not in schema["enum"]:  # type: ignore[operator]
        found.append(f"{where}: {value!r} not in {schema['enum']}")
    if "const" in schema and value != schema["const"]:
        found.append(f"{where}: {value!r} != {schema['const']!r}")
    if isinstance(value, str):
        if "pattern" in schema and not re.search(str(schema["pattern"]), value):
            found.append(f"{where}: {value!r} does not match {schema['pattern']}")
        if len(value) < int(schema.get("minLength", 0)):  # type: ignore[call-overload]
            found.append(f"{where}: {value!r} is too short")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:  # type: ignore[operator]
            found.append(f"{where}: {value} < {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:  # type: ignore[operator]
            found.append(f"{where}: {value} > {schema['maximum']}")
    if isinstance(value, dict):
        properties: dict[str, dict[str, object]] = schema.get("properties", {})  # type: ignore[assignment]
        for key in schema.get("required", []):  # type: ignore[attr-defined]
            if key not in value:
                found.append(f"{where}: missing {key!r}")
        for key, item in value.items():
            if key in properties:
                found += errors(item, properties[key], f"{where}.{key}")
            elif schema.get("additionalProperties") is False:
                found.append(f"{where}: unexpected field {key!r}")
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            found += errors(item, schema["items"], f"{where}[{index}]")  # type: ignore[arg-type]
    for sub in schema.get("allOf", []):  # type: ignore[attr-defined]
        found += errors(value, sub, where)
    if "if" in schema and not errors(value, schema["if"], where):  # type: ignore[arg-type]
        found += errors(value, schema.get("then", {}), where)  # type: ignore[arg-type]
    return found


def assert_valid(event: dict[str, object]) -> None:
    problems = errors(event, SCHEMA)
    assert not problems, f"{event} is not valid: {problems}"


@pytest.mark.parametrize(
    "bad",
    [
        {"ts": "2024-05-01T12:34:56Z", "event": "unban", "src": "198.18.0.2", "reason": "expired"},
        {"ts": "2024-05-01T12:34:56.789Z", "event": "scan", "src": "198.18.0.2"},
        {"ts": "2024-05-01T12:34:56.789Z", "event": "unban", "src": "198.18.0.2"},
        {"ts": "2024-05-01T12:34:56.789Z", "event": "unban", "src": "198.18.0.2", "reason": "x",
         "extra": 1},
        {"ts": "2024-05-01T12:34:56.789Z", "event": "probe", "src": "198.18.0.2", "port": 70000,
         "proto": "tcp", "mode": "tcp", "kind": "Connect", "action": "block"},
        {"ts": "2024-05-01T12:34:56.789Z", "event": "probe", "src": "198.18.0.2", "port": 1,
         "proto": "tcp", "mode": "tcp", "kind": "Connect", "action": "route"},
        {"ts": "2024-05-01T12:34:56.789Z", "event": "ban", "src": "198.18.0.2",
         "backend": "nftables", "reason": "scan"},
        {"ts": "2024-05-01T12:34:56.789Z", "event": "ban", "src": "198.18.0.2",
         "backend": "nftables", "duration": "1h", "reason": "scan"},
        {"ts": "2024-05-01T12:34:56.789Z", "event": "below_trigger", "src": "198.18.0.2",
         "port": True, "proto": "tcp", "mode": "tcp", "kind": "Connect"},
    ],
)
def test_the_validator_rejects_bad_events(bad: dict[str, object]) -> None:
    assert errors(bad, SCHEMA)


# ---------------------------------------------------------------------------------------------
# Builders


def test_rfc3339() -> None:
    assert events.rfc3339(NOW) == "2024-05-01T12:34:56.789Z"
    assert events.rfc3339(0) == "1970-01-01T00:00:00.000Z"
    assert events.rfc3339(1714566896.0004) == "2024-05-01T12:34:56.000Z"


def test_probe_event_fields_and_order() -> None:
    probe = Probe(ip_address("198.18.0.2"), 31337, Mode.STCP, KIND_SYN,
                  destination=ip_address("198.18.0.1"), source_name="scanner.example")
    event = events.probe_event(probe, "block", NOW)
    assert event == {
        "ts": "2024-05-01T12:34:56.789Z", "event": "probe", "src": "198.18.0.2",
        "dst": "198.18.0.1", "port": 31337, "proto": "tcp", "mode": "stcp",
        "kind": "TCP SYN/Normal scan", "host": "scanner.example", "action": "block",
    }
    assert list(event) == ["ts", "event", "src", "dst", "port", "proto", "mode", "kind", "host",
                           "action"]
    assert_valid(event)


def test_probe_event_for_non_detections() -> None:
    probe = Probe(ip_address("fd00:18::2"), 53, Mode.SUDP, KIND_UDP, source_name="fd00:18::2")
    event = events.probe_event(probe, "below_trigger", NOW, count=2)
    assert event["event"] == "below_trigger"
    assert event["count"] == 2
    assert "action" not in event and "host" not in event and "dst" not in event
    assert event["proto"] == "udp"
    assert_valid(event)
    for decision in ("ignored", "already_blocked", "log"):
        assert_valid(events.probe_event(probe, decision, NOW, reason="r"))


def test_probe_event_rejects_unknown_decisions() -> None:
    probe = Probe(ip_address("198.18.0.2"), 1, Mode.TCP, KIND_CONNECT)
    with pytest.raises(ValueError, match="unknown decision 'banned'"):
        events.probe_event(probe, "banned", NOW)


def test_ban_unban_and_failure_events() -> None:
    ban = events.ban_event(ip_address("198.18.0.2"), "nftables", 3600.0, "scan: 31337/tcp", NOW,
                           count=1)
    assert ban == {"ts": "2024-05-01T12:34:56.789Z", "event": "ban", "src": "198.18.0.2",
                   "backend": "nftables", "duration": 3600, "reason": "scan: 31337/tcp", "count": 1}
    assert isinstance(ban["duration"], int)
    assert_valid(ban)
    forever = events.ban_event("fd00:18::2", "ipset", None, "scan", NOW)
    assert forever["duration"] is None
    assert_valid(forever)
    assert events.ban_event("198.18.0.2", "route", 90.25, "scan", NOW)["duration"] == 90.25
    unban = events.unban_event(ip_address("198.18.0.2"), "expired", NOW)
    assert unban == {"ts": "2024-05-01T12:34:56.789Z", "event": "unban", "src": "198.18.0.2",
                     "reason": "expired"}
    assert_valid(unban)
    probe = Probe(ip_address("198.18.0.2"), 1, Mode.TCP, KIND_CONNECT)
    failed = events.action_failed_event("198.18.0.2", "route", "exit status 2", NOW, probe=probe)
    assert failed["action"] == "route" and failed["port"] == 1 and failed["mode"] == "tcp"
    assert_valid(failed)
    assert_valid(events.action_failed_event("198.18.0.2", "native", "no table", NOW))


addresses = st.one_of(
    st.integers(0, 2**32 - 1).map(lambda n: ip_address(n)),
    st.integers(0, 2**128 - 1).map(lambda n: ip_address(n.to_bytes(16, "big"))),
)
probes = st.builds(
    Probe,
    source=addresses,
    port=st.integers(0, 65535),
    mode=st.sampled_from(list(Mode)),
    kind=st.text(min_size=1, max_size=60),
    destination=st.none() | addresses,
    source_name=st.none() | st.text(max_size=60),
)


@given(probes, st.sampled_from(events.DECISIONS), st.floats(0, 4e9),
       st.none() | st.integers(0, 10**6), st.none() | st.text(max_size=40))
def test_every_probe_event_is_valid_and_one_line(probe, decision, now, count, reason) -> None:
    event = events.probe_event(probe, decision, now, count=count, reason=reason)
    assert_valid(event)
    line = events.encode(event)
    assert "\n" not in line
    assert json.loads(line) == event


@given(addresses, st.text(min_size=1, max_size=20), st.none() | st.floats(0, 1e9),
       st.text(max_size=40), st.floats(0, 4e9))
def test_every_ban_event_is_valid(address, backend, duration, reason, now) -> None:
    assert_valid(events.ban_event(address, backend, duration, reason, now))


# ---------------------------------------------------------------------------------------------
# the engine's decisions are the event log's


def engine(**settings: object) -> Engine:
    return Engine(EngineSettings(**settings), {ip_address("198.18.0.9")})  # type: ignore[arg-type]


def probe_from(address: str, mode: Mode = Mode.TCP) -> Probe:
    return Probe(ip_address(address), 1, mode, KIND_CONNECT)


def test_each_engine_decision_is_an_event_decision() -> None:
    assert {d.value for d in Decision} == set(events.DECISIONS)
    blocking = engine(block_tcp=1, kill_hosts_deny="ALL: $TARGET$")
    probe = probe_from("198.18.0.2")
    assert blocking.observe(probe, NOW).decision == "block"
    assert blocking.observe(probe, NOW).decision == "already_blocked"
    ignored = probe_from("198.18.0.9")
    assert blocking.observe(ignored, NOW).decision == "ignored"

    logging_only = engine(block_tcp=0)
    assert logging_only.observe(probe, NOW).decision == "log"

    triggered = engine(scan_trigger=3, block_tcp=1, kill_hosts_deny="ALL: $TARGET$")
    decisions = [triggered.observe(probe, NOW).decision for _ in range(3)]
    assert decisions == ["below_trigger", "below_trigger", "block"]


def test_the_schema_s_field_descriptions_name_the_values_docs_events_md_names() -> None:
    # A SIEM integrator reads the schema: after the day's merges it still said a ban's backend is
    # nftables, ipset or route and `count` a below_trigger field only, while events.md (and the
    # code) had hosts_deny, none and a ban's count of earlier bans.
    page = (SCHEMA_PATH.parent / "events.md").read_text()
    properties: dict[str, dict[str, object]] = SCHEMA["properties"]
    stale = {}
    for name, prop in properties.items():
        row = re.search(rf"^\| `{name}` \|[^|]*\|(.*)\|$", page, re.M)
        assert row is not None, name
        if "description" not in prop:
            continue
        said = f"{prop['description']} {' '.join(map(str, prop.get('enum', [])))}"  # type: ignore[call-overload]
        named = set(re.findall(r"`([a-z_]+)`", row.group(1))) - set(properties)
        if missing := sorted(value for value in named if not re.search(rf"\b{value}\b", said)):
            stale[name] = missing
    assert stale == {}


def test_rate_limited_repeats_are_already_blocked() -> None:
    eng = engine(block_tcp=0, log_repeat_limit=1, log_repeat_window=60.0)
    probe = probe_from("198.18.0.2")
    outcomes = [eng.observe(probe, NOW + i).decision for i in range(5)]
    assert outcomes == ["log"] + ["already_blocked"] * 4


# ---------------------------------------------------------------------------------------------
# EventLog


def lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_writes_one_object_per_line(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    with events.EventLog(str(path)) as log:
        assert path.exists()  # opened at once: a bad path shows at start-up
        assert log.write(events.unban_event("198.18.0.2", "expired", NOW))
        assert log.write({"ts": "x", "event": "probe", "reason": "two\nlines \u00e9"})
    assert lines(path) == [
        {"ts": "2024-05-01T12:34:56.789Z", "event": "unban", "src": "198.18.0.2", "reason": "expired"},
        {"ts": "x", "event": "probe", "reason": "two\nlines \u00e9"},
    ]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o640 & ~umask


def test_follows_rotation_by_rename_and_by_delete(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = events.EventLog(str(path))
    log.write({"n": 1})
    os.rename(path, tmp_path / "events.jsonl.1")
    log.write({"n": 2})
    path.unlink()
    log.write({"n": 3})
    log.close()
    assert lines(tmp_path / "events.jsonl.1") == [{"n": 1}]
    assert lines(path) == [{"n": 3}]


def test_copytruncate_keeps_appending(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = events.EventLog(str(path))
    log.write({"n": 1})
    os.truncate(path, 0)
    log.write({"n": 2})
    log.close()
    assert path.read_text() == '{"n":2}\n'  # O_APPEND: no hole of NULs before the new line


def test_reopen_and_failures(tmp_path: Path) -> None:
    directory = tmp_path / "logs"
    directory.mkdir()
    path = directory / "events.jsonl"
    log = events.EventLog(str(path))
    path.unlink()
    directory.rmdir()
    log.reopen()  # nowhere to open it: counted, not raised
    assert log.failures == 1
    assert not log.write({"n": 1})
    assert log.failures == 2
    assert log.last_error is not None and log.last_error.startswith(str(path))
    directory.mkdir()
    assert log.write({"n": 2})  # back once the directory is
    log.close()
    assert lines(path) == [{"n": 2}]


def test_reports_a_bad_path_at_once(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        events.EventLog(str(tmp_path / "missing" / "events.jsonl"))


def test_threads_never_interleave_lines(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    log = events.EventLog(str(path))

    def writer(n: int) -> None:
        for i in range(200):
            log.write({"writer": n, "i": i, "pad": "x" * 500})

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.close()
    records = lines(path)
    assert len(records) == 800
    for n in range(4):
        assert [r["i"] for r in records if r["writer"] == n] == list(range(200))


def test_a_short_write_is_rolled_back_and_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # issue 9.4/9.5: never a partial JSON line; the failure reaches the daemon's WriteFailures.
    import os

    path = tmp_path / "events.jsonl"
    log = events.EventLog(str(path))
    reported: list[tuple[str, str]] = []
    log.reporter = lambda where, error: reported.append((where, error))
    assert log.write({"n": 1})
    real = os.write
    monkeypatch.setattr("os.write", lambda fd, data: real(fd, bytes(data)[:5]))
    assert not log.write({"n": 2, "padding": "x" * 40})
    monkeypatch.undo()
    assert path.read_text() == '{"n":1}\n'
    assert reported and reported[0][0] == str(path) and "short write" in reported[0][1]
    assert log.write({"n": 3})
    log.close()
    assert path.read_text() == '{"n":1}\n{"n":3}\n'
