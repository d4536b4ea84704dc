"""Would compiling the Python close the classic path's gap to 1.2? `sudo .venv/bin/python -m
bench.compiled_path --probes 40 --rounds 2 [--ours-rev REV]`.

Issue 11 asks for the classic path's detection line and KILL_ROUTE's start at or below 1.2's.
bench/python_floor.py shows that the least Python can do only reaches 1.2; this asks the other
question: the same source, with the modules a lone probe runs through compiled to C by mypyc
(which comes with mypy, a development dependency already; it needs gcc and the Python headers).
The revision's src/ is exported twice, one copy compiled; each round runs the plain copy, the
compiled copy and Debian's 1.2 under bench/classic_path.py's single SYNs, and prints the medians.
A scratch measure for a decision, not a way to run the daemon: the compiled copy is thrown away.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench import harness
from bench.classic_path import report, run_probes
from bench.harness import BenchError

# What a lone probe runs through, from the packet's parse to the line. Left out: sensors/capture
# (mypyc 1.x emits C that does not build for its ctypes use), sensors/packet (its dataclasses'
# layout constants would need ClassVar annotations first) and service/daemon (it imports every
# layer; compiling it compiles the program).
MODULES = (
    "portsentry/core/actions.py", "portsentry/core/addresses.py", "portsentry/core/engine.py",
    "portsentry/core/flood.py", "portsentry/core/guard.py", "portsentry/core/messages.py",
    "portsentry/core/probe.py", "portsentry/config/ignore.py", "portsentry/journal/journal.py",
    "portsentry/journal/syslog.py", "portsentry/sensors/base.py", "portsentry/sensors/listeners.py",
    "portsentry/sensors/sockdiag.py", "portsentry/sensors/stealth.py", "portsentry/sensors/watches.py",
    "portsentry/sensors/host_addresses.py",
)


def compile_copy(src: Path) -> None:
    """mypyc over MODULES in `src`, the extension modules put beside their sources; BenchError
    unless every one of them then imports from its compiled file."""
    built = subprocess.run([sys.executable, "-m", "mypyc", *MODULES], cwd=src, capture_output=True,
                           text=True, timeout=900, check=False)
    if built.returncode != 0:
        raise BenchError(f"mypyc failed:\n{(built.stdout + built.stderr)[-3000:]}")
    for library in (src / "build").glob("lib.*"):
        shutil.copytree(library, src, dirs_exist_ok=True)
    names = [module.removesuffix(".py").replace("/", ".") for module in MODULES]
    check = ("import importlib, sys\n"
             f"plain = [n for n in {names!r} if not importlib.import_module(n).__file__.endswith('.so')]\n"
             "sys.exit(' '.join(plain) or None)")
    loaded = subprocess.run([sys.executable, "-c", check], env={"PYTHONPATH": str(src)},
                            capture_output=True, text=True, timeout=60, check=False)
    if loaded.returncode != 0:
        raise BenchError(f"not compiled after the build: {loaded.stderr.strip()}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compiled_path", description=__doc__)
    parser.add_argument("--probes", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ours-rev", default="HEAD", help="the revision whose src/ is measured")
    args = parser.parse_args(argv)
    harness.require_root("bench.compiled_path")
    revision = harness.resolve_revision(args.ours_rev)
    with tempfile.TemporaryDirectory(prefix="ps-mypyc-") as tmp:
        plain = harness.export_revision(revision, Path(tmp) / "plain")
        compiled = harness.export_revision(revision, Path(tmp) / "compiled")
        compile_copy(compiled)
        print(f"git {revision}, {len(MODULES)} modules compiled by mypyc", flush=True)
        for round_ in range(1, args.rounds + 1):
            for name, source in (("plain", plain), ("compiled", compiled)):
                print(report(f"round {round_}: ours, {name}", run_probes(harness.Ours(source=source),
                                                                          args.probes)), flush=True)
            print(report(f"round {round_}: 1.2", run_probes(harness.Debian12(), args.probes)), flush=True)
    print(f"load average {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
