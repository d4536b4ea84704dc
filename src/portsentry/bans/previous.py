"""The nftables table the last run kept its bans in, when this start uses another (NFT_TABLE
changed, or BAN_BACKEND no longer nftables): removed, as `portsentry flush` would have removed it.

The table is kept at every stop so that bans protect during a restart; a start with another
NFT_TABLE then made a new table and left the old one in the kernel for good, its drop chain still
dropping every host it held (for ever with BLOCK_TIME 0), unseen by `list` and untouched by
`unblock`, and its capture chain still banning first probes nobody recorded. The ban store is the
truth: its bans are restored into this run's table (bans.restore), so removing the old one loses
no ban the store knows. Its name is kept in STATE_DIR/nft-table with the pid of the daemon that
made it: a daemon still running with that table (another instance sharing the state directory)
keeps it.

The removal comes in two steps. Before the sensors open, only the old table's capture chains go
(they log to the same NFLOG group, and its first-probe ban would make bans nobody records); its
drop chain and sets stay. The table itself goes once this run's restore has put the stored bans
into the kernel: a start that fails before (a capture that cannot open) leaves the old table
dropping what it held, and it is still remembered, so the next start retires it.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable

from portsentry.core import messages
from portsentry.responders.backend import BackendError, BanBackend, run_argv
from portsentry.responders.nftables import NftablesBackend

TABLE_FILE = "nft-table"
_LINE = re.compile(r"([A-Za-z][A-Za-z0-9_]{0,31}) (\d+)")

Logger = Callable[[str], None]
Maker = Callable[[str], NftablesBackend]


def _maker(backend: BanBackend | None) -> Maker:
    # Through the ban backend's runner; only nft commands are needed, no netlink socket.
    runner = backend.runner if backend is not None else run_argv
    return lambda name: NftablesBackend(table=name, runner=runner, mechanism="cli")


def _retiring(current: str | None, previous: str | None, owner: int | None) -> str | None:
    """The table the last run used (`previous`, by `owner`), when this start must retire it."""
    return previous if previous is not None and previous != current and not _running(owner) else None


def quiet_previous_table(backend: BanBackend | None, path: str, log: Logger,
                         make: Maker | None = None) -> None:
    """At start, before the sensors open: the capture chains of the table the last run used, when
    it is not this run's, are removed; its bans stay in force until retire_previous_table."""
    current = backend.table if isinstance(backend, NftablesBackend) else None
    previous = _retiring(current, *_read(path, log))
    if previous is None:
        return
    try:
        old = (make or _maker(backend))(previous)
        if old.has_table():
            old.drop_capture()
    except (BackendError, OSError, ValueError) as error:
        log(messages.config_error(f"cannot remove the capture chains of the nftables table inet "
                                  f"{previous} the last run used: {error}"))


def retire_previous_table(backend: BanBackend | None, path: str, log: Logger,
                          make: Maker | None = None, pid: int | None = None) -> str | None:
    """At start, once the stored bans are restored: remove the table the last run used when it is
    not this run's, then remember this run's (or forget it, without nftables). Returns the table
    removed, or None."""
    current = backend.table if isinstance(backend, NftablesBackend) else None
    previous, owner = _read(path, log)
    removed = None
    if (old := _retiring(current, previous, owner)) is not None:
        try:
            if (make or _maker(backend))(old).teardown() is not None:
                removed = old
        except (BackendError, OSError, ValueError) as error:
            log(messages.config_error(f"cannot remove the nftables table inet {previous} the last run "
                                      f"used: {error}; `nft delete table inet {previous}` removes it"))
            return None  # remembered still: the next start tries again
        if removed is not None:
            now = f"NFT_TABLE is now {current}" if current is not None else "BAN_BACKEND is not nftables now"
            log(f"adminalert: removed the nftables table inet {previous} that the last run kept its bans "
                f"in ({now}); the ban store's bans are restored into this run's")
    if current is not None or previous is not None:
        _write(path, current, pid if pid is not None else os.getpid(), log)
    return removed


def _read(path: str, log: Logger) -> tuple[str | None, int | None]:
    try:
        with open(path, encoding="ascii") as handle:
            text = handle.read().strip()
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as error:
        log(messages.store_failed(f"{path}: {error}"))
        return None, None
    found = _LINE.fullmatch(text)
    return (found.group(1), int(found.group(2))) if found else (None, None)


def _running(pid: int | None) -> bool:
    """Whether `pid` is another portsentry still running (it may use its table right now)."""
    if pid is None or pid == os.getpid():
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return b"portsentry" in handle.read()
    except OSError:
        return False


def _write(path: str, table: str | None, pid: int, log: Logger) -> None:
    try:
        if table is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        with open(path + ".new", "w", encoding="ascii") as handle:
            handle.write(f"{table} {pid}\n")
        os.replace(path + ".new", path)
    except OSError as error:
        log(messages.store_failed(f"{path}: {error.strerror or error}"))
