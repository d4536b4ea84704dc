"""Where a reader stands in the fleet's stream: stream ids as Redis orders them, and whether
entries after a reader's cursor are gone (trimmed, or lost with Redis's data). Pure: ids in,
answers out; fleet.reader decides what to do about it.
"""

from __future__ import annotations


def stream_order(entry: bytes) -> tuple[int, int]:
    """A stream id as (milliseconds, sequence), which order as the stream does."""
    ms, _, seq = entry.partition(b"-")
    return int(ms), int(seq or 0)


_SEQ_MAX = 2**64 - 1


def trimmed_past(first: bytes, cursor: bytes) -> bool:
    """Whether the stream's oldest entry `first` lies beyond the one after `cursor`: entries a
    reader at `cursor` has not seen may have been trimmed (or lost by a Redis restart)."""
    ms, seq = stream_order(cursor)
    return stream_order(first) > ((ms, seq + 1) if seq < _SEQ_MAX else (ms + 1, 0))


def just_before(first: bytes) -> bytes:
    """The cursor from which XREAD returns `first` and what follows it."""
    ms, seq = stream_order(first)
    if seq:
        return f"{ms}-{seq - 1}".encode()
    return f"{ms - 1}-{_SEQ_MAX}".encode() if ms else b"0-0"


def lost_past(first: bytes | None, cursor: bytes | None, newest: bytes | None = None) -> bool:
    """Whether a reader at `cursor` must load the active set: it has no cursor, or what follows
    its cursor is gone (trimmed, or the stream itself lost: empty under a cursor that had read
    entries, or made again with its `newest` id below the cursor, by a Redis that came back empty
    with its clock behind: trimming never removes the newest entry, so only a new stream can end
    before the cursor). b"0-0" is the cursor of a reader that loaded an empty fleet."""
    if cursor is None:
        return True
    if cursor == b"0-0":
        return False
    if newest is not None and stream_order(newest) < stream_order(cursor):
        return True
    return first is None or trimmed_past(first, cursor)
