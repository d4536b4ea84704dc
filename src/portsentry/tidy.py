"""`portsentry hosts-deny tidy`: drop repeated rules and the lines of our bans that are over from
hosts.deny, leaving every other line and comment as it is and where it is.

Design
- plan_tidy() decides on text alone. It works on hosts_access(5) rules, not raw lines: a line
  ending in a backslash continues on the next, so a rule (or comment) can span several lines and
  is kept or dropped whole; dropping one line of it would join its neighbours into a different
  rule. A rule is dropped when an identical rule (same lines, exact text) came earlier, or when
  it is a one-line rule the store says we wrote for a ban that is over (compared like HostsDeny
  compares, ignoring trailing blanks and CR). Comments and blank lines are never dropped, even
  repeated ones: they are layout, not rules.
- tidy_hosts_deny() does the file part with HostsDeny's own protocol by driving a HostsDeny
  (a subclass, to reach its internals; hostsdeny.py has no public helper for a rewrite): its
  flock on `<path>.portsentry.lock`, its refusals (symlinks, world-writable files), and its
  rewrite (temporary file with the original mode, owner and xattrs, fsync, rename, then copying
  over lines a lockless appender added meanwhile). So tidy, the daemon and the CLI never
  interleave. The store is read while the lock is held, so a ban the daemon records before it
  writes its line is seen as active.
- Bytes are kept as they are: the kept lines are written back from the original bytes, so a
  missing final newline, CRs or undecodable bytes survive. Nothing to remove means no write.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

from portsentry.responders.hostsdeny import HostsDeny, _read_all, _split
from portsentry.store import BanStore

_TRAILING = " \t\r"


@dataclass(frozen=True)
class TidyReport:
    removed_duplicates: list[tuple[int, str]]  # (1-based line number, text) in the old file
    removed_expired: list[tuple[int, str]]
    kept: int  # lines left

    @property
    def changed(self) -> bool:
        return bool(self.removed_duplicates or self.removed_expired)


def _rules(lines: list[str]) -> Iterator[range]:
    """Index ranges of the logical lines: a line ending in a backslash continues on the next."""
    start = 0
    for i, line in enumerate(lines):
        if not line.endswith("\\"):
            yield range(start, i + 1)
            start = i + 1
    if start < len(lines):
        yield range(start, len(lines))  # a continuation cut off by the end of the file


def _is_rule(first_line: str) -> bool:
    stripped = first_line.lstrip(" \t\r\f\v")
    return bool(stripped) and not stripped.startswith("#")


def _plan(lines: list[str], ours_expired: set[str]) -> tuple[list[int], TidyReport]:
    stale = {line.rstrip(_TRAILING) for line in ours_expired}
    seen: set[tuple[str, ...]] = set()
    kept: list[int] = []
    duplicates: list[tuple[int, str]] = []
    expired: list[tuple[int, str]] = []
    for span in _rules(lines):
        text = tuple(lines[i] for i in span)
        if not _is_rule(text[0]):
            kept.extend(span)
        elif len(text) == 1 and text[0].rstrip(_TRAILING) in stale:
            expired.extend((i + 1, lines[i]) for i in span)
        elif text in seen:
            duplicates.extend((i + 1, lines[i]) for i in span)
        else:
            seen.add(text)
            kept.extend(span)
    return kept, TidyReport(removed_duplicates=duplicates, removed_expired=expired, kept=len(kept))


def plan_tidy(lines: list[str], ours_expired: set[str]) -> tuple[list[str], TidyReport]:
    """The tidied lines and what went; `lines` without their newlines, `ours_expired` the lines
    we wrote for bans that are over."""
    kept, report = _plan(lines, ours_expired)
    return [lines[i] for i in kept], report


class _HostsDenyFile(HostsDeny):
    """HostsDeny with one more operation, a whole-file tidy under its lock."""

    def tidy(self, store: BanStore | None, now: float, dry_run: bool) -> TidyReport:
        with self._locked():
            try:
                fd = self._open(os.O_RDONLY, create=False)
            except FileNotFoundError:
                return TidyReport(removed_duplicates=[], removed_expired=[], kept=0)
            try:
                content = _read_all(fd)
                raw = _split(content)
                texts = [r.rstrip(b"\n").decode("utf-8", errors="surrogateescape") for r in raw]
                ours = store.stale_lines(now) if store is not None else set()
                kept, report = _plan(texts, ours)
                if report.changed and not dry_run:
                    self._replace(fd, b"".join(raw[i] for i in kept), len(content))
            finally:
                os.close(fd)
        if store is not None and report.removed_expired and not dry_run:
            store.forget_lines({text for _, text in report.removed_expired}, now)
        return report


def tidy_hosts_deny(path: str, store: BanStore | None, now: float, dry_run: bool) -> TidyReport:
    """Tidy the hosts.deny at `path` (see the module docstring); with dry_run only report.

    Without a store only repeated rules go. Raises HostsDenyError when the file is unsafe to
    rewrite; a missing file is an empty one.
    """
    return _HostsDenyFile(path).tidy(store, now, dry_run)


def format_report(report: TidyReport, *, path: str = "hosts.deny", dry_run: bool = False) -> str:
    """The report for people, one removed line per line."""
    verb = "would remove" if dry_run else "removed"
    if not report.changed:
        return f"{path}: nothing to tidy ({report.kept} lines)"
    lines = [
        f"{path}: {verb} {len(report.removed_duplicates)} repeated and "
        f"{len(report.removed_expired)} lifted/expired ban lines; {report.kept} lines "
        + ("would stay" if dry_run else "kept")
    ]
    removed = [(n, "repeated", t) for n, t in report.removed_duplicates] + [
        (n, "ban over", t) for n, t in report.removed_expired
    ]
    lines.extend(f"  line {n}: {why}: {text!r}" for n, why, text in sorted(removed))
    return "\n".join(lines)
