"""The layout shows the flow, and this test holds it (issue 10.7): it parses every module's imports.

The packages, lowest first; each may import only the ones listed for it (and itself):

- netlink: the one netlink codec; nothing of ours;
- core: the probe, actions, the engine and what it decides with; it does no I/O, so it is tested
  with plain lists of probes;
- config: the configuration and the ignore list; core;
- host: facts about this host (addresses, routes, privileges); core and netlink;
- journal: syslog, history files, the event log, telemetry; core;
- sensors: packets and connections into probes; neither responders nor the ban lifecycle;
- responders: carry out blocks (nftables, hosts.deny, shell); not the ban lifecycle that drives them;
- bans: the one ban lifecycle (store, change feed, restore, tidy, bulk); responders, not the service;
- report: `portsentry report`, which only reads the ban store; core, config, journal, bans;
- fleet: bans shared through Redis; the ban lifecycle below it, never the service or the cli;
- service: the daemon's threads and the control socket; everything below but report;
- cli: the command line, which nothing imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "portsentry"

ALLOWED = {
    "netlink": set(),
    "core": set(),
    "config": {"core"},
    "host": {"core", "netlink"},
    "journal": {"core"},
    "sensors": {"core", "netlink", "host"},
    "responders": {"core", "netlink", "host", "journal", "config"},
    "bans": {"core", "config", "host", "journal", "responders"},
    "report": {"core", "config", "journal", "bans"},
    "fleet": {"core", "config", "host", "journal", "responders", "bans"},
    "service": {"core", "config", "host", "journal", "netlink", "sensors", "responders", "bans", "fleet"},
    "cli": {"core", "config", "host", "journal", "netlink", "sensors", "responders", "bans", "service",
            "report", "fleet"},
}
TOP_LEVEL = {"", "__main__"}  # the package itself, and `python -m portsentry`


def modules() -> dict[str, set[str]]:
    """Module name (without the package) -> the portsentry modules it imports."""
    found: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = list(parts[:-1])
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - node.level + 1]
                    target = ".".join([*base, *([node.module] if node.module else [])])
                    names = [target] if node.module else [".".join([*base, a.name]) for a in node.names]
                elif (node.module or "").startswith("portsentry"):
                    names = [node.module.removeprefix("portsentry").lstrip(".")]  # type: ignore[union-attr]
                else:
                    continue
                imported.update(n for n in names)
            elif isinstance(node, ast.Import):
                imported.update(a.name.removeprefix("portsentry").lstrip(".") for a in node.names
                                if a.name.startswith("portsentry"))
        found[name] = {n for n in imported if n}
    return found


def top(name: str) -> str:
    return name.split(".", 1)[0]


def test_the_map_sees_the_package():
    found = modules()
    assert {"core.engine", "service.daemon", "sensors.stealth", "responders.nftables", "netlink.codec",
            "bans.lifecycle", "cli.main"} <= set(found)
    assert "core.probe" in found["core.engine"] and "sensors.packet" in found["sensors.stealth"]


def test_every_module_lives_in_a_layer():
    strays = {m for m in modules() if top(m) not in ALLOWED and m not in TOP_LEVEL}
    assert strays == set()


def violations(found: dict[str, set[str]]) -> set[tuple[str, str]]:
    return {(m, i) for m, imports in found.items() if top(m) in ALLOWED
            for i in imports if top(i) != top(m) and top(i) not in ALLOWED[top(m)]}


def test_each_layer_imports_only_the_layers_below_it():
    assert violations(modules()) == set()


def test_core_imports_only_core():
    bad = {(m, i) for m, imports in modules().items() if top(m) == "core"
           for i in imports if top(i) != "core"}
    assert bad == set()


def test_sensors_import_neither_responders_nor_bans():
    bad = {(m, i) for m, imports in modules().items() if top(m) == "sensors"
           for i in imports if top(i) in {"responders", "bans"}}
    assert bad == set()


def test_the_netlink_codec_imports_nothing_of_ours():
    assert {i for m, imports in modules().items() if top(m) == "netlink" for i in imports
            if top(i) != "netlink"} == set()


def test_nothing_imports_the_command_line():
    bad = {m for m, imports in modules().items() if top(m) != "cli" and m != "__main__"
           for i in imports if top(i) == "cli"}
    assert bad == set()


def test_the_rule_catches_a_violation(tmp_path, monkeypatch):
    """The checker itself can fail: a core module importing the daemon is reported."""
    fake = tmp_path / "portsentry"
    (fake / "core").mkdir(parents=True)
    (fake / "core" / "engine.py").write_text("from portsentry.service.daemon import Daemon\n")
    (fake / "core" / "probe.py").write_text("from ..service import daemon\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["SRC"]), "SRC", fake)
    found = modules()
    assert found == {"core.engine": {"service.daemon"}, "core.probe": {"service"}}
    assert violations(found) == {("core.engine", "service.daemon"), ("core.probe", "service")}


def test_the_unit_tests_mirror_the_packages():
    tests = Path(__file__).resolve().parent
    packages = {p.name for p in SRC.iterdir() if (p / "__init__.py").exists()}
    assert packages == set(ALLOWED)
    assert {p for p in packages if not any((tests / p).glob("test_*.py"))} == set()
