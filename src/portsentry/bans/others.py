"""Bans and lifts the daemon did not make, reported by the daemon: the `ban` and `unban` events
and the ban metrics of changes the command line wrote to the store directly (`block --file`,
`unblock --file`, and `block`/`unblock` while the daemon was down).

That process has no event log or metrics endpoint of its own, so it leaves its changes marked
unreported (BanStore(reports=False)); the daemon claims them once a round, and once at its
start before it lifts what expired meanwhile, so a ban made while it was down is said before its
expiry. A claimed change is marked in the same transaction: each is reported once, across
restarts too (a crash between the claim and the event loses the event rather than saying it
twice).
"""

from __future__ import annotations

from collections.abc import Sequence

from portsentry.bans.lifecycle import BanManager
from portsentry.bans.records import BLOCK_FAILED, MANUAL_REASON, Change, holder_of

CLAIM_BATCH = 10_000  # changes reported per round; a larger `block --file` takes a few rounds


def report_others(bans: BanManager) -> int:
    """Report the changes nobody has reported yet; how many were claimed."""
    store = bans.store
    claimed = store.claim_unreported(CLAIM_BATCH)
    if not claimed:
        return 0
    held = {ban.address: ban for ban in store.get_many({change.address for change in claimed})}
    native = bans.backend.name if bans.backend is not None else None
    for change in _said(claimed):
        if change.bans:
            ban = held.get(change.address)
            bans.telemetry.ban(change.address, holder_of(ban, native),
                               None if change.expires is None else change.expires - change.at,
                               MANUAL_REASON, change.at,
                               count=None if ban is None else max(ban.offences - 1, 0),
                               # A ban given a later end (`block` of a banned address) is no new ban.
                               new=change.kind == "ban")
        else:
            bans.telemetry.unban(change.address, change.detail, change.at)
    return len(claimed)


def _said(changes: Sequence[Change]) -> list[Change]:
    """The changes to report: a ban whose every step failed is dropped again ("block failed") and
    was never in force, so neither it nor its drop is said when both are claimed together (the
    daemon's own such blocks say neither either)."""
    dropped: set[int] = set()
    last_ban: dict[object, int] = {}
    for index, change in enumerate(changes):
        if change.kind == "ban":
            last_ban[change.address] = index
        elif not change.bans and change.detail == BLOCK_FAILED and change.address in last_ban:
            dropped |= {last_ban.pop(change.address), index}
    return [change for index, change in enumerate(changes) if index not in dropped]
