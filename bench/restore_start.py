"""How long bans.restore.restore_bans takes with N stored bans (bench/many_bans.py's store: 30-day
bans, IPv4 then IPv6) and the nftables backend, in three starts: into empty sets (a reboot), after
a clean stop (the sets are only added to), after a crash (no record of a clean stop: the sets are
replaced). Runs each revision in a private network namespace of its own (`unshare --net`), the
revisions alternating, and prints one line per run; a revision older than the clean-stop record
times its one restore path three times.

    python -m bench.restore_start --count 1000000 --runs 5 SRC_DIR [SRC_DIR ...]

SRC_DIR is a `src` directory (this tree's, or `git archive REV src | tar -x -C DIR`'s). Root only.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.many_bans import EXPIRY, populate

CHILD = r"""
import inspect, shutil, sys, time
src, store_path, count, work = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
sys.path.insert(0, src)
from portsentry.bans import restore
from portsentry.bans.lifecycle import BanManager, BanPolicy
from portsentry.bans.store import BanStore
from portsentry.responders.hostsdeny import HostsDeny
from portsentry.responders.nftables import NftablesBackend
shutil.copy(store_path, work + "/bans.sqlite3")
backend = NftablesBackend(set_size=max(65536, 2 * count))
backend.setup()
bans = BanManager(BanStore(work + "/bans.sqlite3"), backend, HostsDeny(work + "/hosts.deny"),
                  BanPolicy(), lambda line: None)
new = "stop_path" in inspect.signature(restore.restore_bans).parameters
stop = work + "/kernel-sync"
out = []
for label in ("reboot", "clean-restart", "crash-restart"):
    if new and label == "clean-restart":
        restore.remember_stop(bans, stop)
    started = time.perf_counter()
    if new:
        restore.restore_bans(bans, time.time(), work + "/kernel-id", stop)
    else:
        restore.restore_bans(bans, time.time(), work + "/kernel-id")
    out.append(f"{label} {time.perf_counter() - started:.3f} s")
print(f"{src}: {count} bans: " + ", ".join(out), flush=True)
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="+", help="src directories to compare")
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="restore-start-") as temp:
        store = Path(temp) / "store.sqlite3"
        populate(store, args.count, time.time() + EXPIRY)
        for _run in range(args.runs):
            for source in args.sources:
                with tempfile.TemporaryDirectory(dir=temp) as work:
                    subprocess.run(["unshare", "--net", sys.executable, "-c", CHILD,
                                    str(Path(source).resolve()), str(store), str(args.count), work],
                                   check=True, timeout=600)
    return 0


if __name__ == "__main__":
    sys.exit(main())
