"""A private view of the fixed paths a packaged portsentry uses (/etc/portsentry, /etc/default,
/var/lib/portsentry, /var/log/portsentry, /run), for tests of the Debian drop-in, its init script
and its logrotate snippet.

Commands run through `wrap()` get a private mount namespace (`unshare -m`, propagation private):
/etc and /var become overlays of the host's (so mount points can be made without touching the
host), and empty directories of the test are bind-mounted on the paths above, so nothing of the
host's shows through them and nothing written there reaches the host. The directories are seen
from the test as `etc`, `default`, `lib`, `log` and `run`. A process started later with
`nsenter -t PID -m` sees the same view as PID.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

# Path inside the namespace -> attribute naming the test's directory behind it.
MOUNTS = (("/etc/portsentry", "etc"), ("/etc/default", "default"), ("/var/lib/portsentry", "lib"),
          ("/var/log/portsentry", "log"), ("/run", "run"))


class PrivateRoot:
    def __init__(self, base: Path) -> None:
        self.base = base
        for name in ("etc-upper", "etc-work", "var-upper", "var-work"):
            (base / name).mkdir(parents=True)
        self.etc, self.default, self.lib, self.log, self.run = (base / name for _path, name in MOUNTS)
        for _path, name in MOUNTS:
            # 0755: logrotate refuses to rotate in a group- or world-writable directory.
            (base / name).mkdir(mode=0o755)

    def prologue(self) -> str:
        """Shell commands that set the view up (run inside the new mount namespace)."""
        base = shlex.quote(str(self.base))
        lines = ["set -e"]
        for top in ("etc", "var"):
            lines.append(f"mount -t overlay overlay -o lowerdir=/{top},upperdir={base}/{top}-upper,"
                         f"workdir={base}/{top}-work /{top}")
        for path, name in MOUNTS:
            lines.append(f"mkdir -p {path} && mount --bind {base}/{name} {path}")
        return "\n".join(lines) + "\n"

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """`argv` run in a new private mount namespace with this view."""
        return ["unshare", "-m", "--propagation", "private", "sh", "-c", self.prologue() + 'exec "$@"',
                "sh", *argv]


def enter(pid: int, argv: Sequence[str]) -> list[str]:
    """`argv` in the mount and network namespaces of process `pid` (one started by `wrap()`)."""
    return ["nsenter", "-t", str(pid), "-m", "-n", *argv]
