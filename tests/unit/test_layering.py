"""The layout shows the flow, and this test holds it (issue 10.7): it parses every module's imports.

- core (the probe, actions, the engine and what it decides with) imports only core: it does no
  I/O, so it is tested with plain lists of probes;
- sensors import neither responders nor the ban lifecycle: they only turn packets into probes;
- the netlink codec imports nothing of ours;
- nothing imports the command line.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "portsentry"

CORE = {"probe", "actions", "engine", "guard", "flood", "messages", "addresses", "ports"}
BANS = {"bans", "store", "bulk", "restore", "tidy", "maintenance"}


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
    assert {"engine", "daemon", "sensors.stealth", "responders.nftables", "netlink"} <= set(found)
    assert "probe" in found["engine"] and "sensors.packet" in found["sensors.stealth"]


def test_core_imports_only_core():
    bad = {(m, i) for m, imports in modules().items() if m in CORE for i in imports if top(i) not in CORE}
    assert bad == set()


def test_sensors_import_neither_responders_nor_bans():
    bad = {(m, i) for m, imports in modules().items() if top(m) == "sensors"
           for i in imports if top(i) == "responders" or top(i) in BANS}
    assert bad == set()


def test_the_netlink_codec_imports_nothing_of_ours():
    assert modules()["netlink"] == set()


def test_nothing_imports_the_command_line():
    bad = {m for m, imports in modules().items() if "cli" in imports and m != "__main__"}
    assert bad == set()
