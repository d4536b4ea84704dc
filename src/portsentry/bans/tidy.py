"""`portsentry hosts-deny tidy`: drop repeated rules and the lines of our bans that are over from
hosts.deny, leaving every other line and comment as it is and where it is.

Design
- plan_tidy() decides on text alone. It works on hosts_access(5) rules, not raw lines: a line
  ending in a backslash continues on the next, so a rule (or comment) can span several lines and
  is kept or dropped whole; dropping one line of it would join its neighbours into a different
  rule. A rule is dropped when an identical rule (same lines, exact text) came earlier, or when
  it is a one-line rule the store says we appended for a ban that is over (compared like
  HostsDeny compares, ignoring trailing blanks and CR). Only the copies we appended count as
  ours: a rule someone else wrote always keeps one copy. Comments and blank lines are never
  dropped, even repeated ones: they are layout, not rules.
- tidy_hosts_deny() does the file part with HostsDeny's own protocol by driving a HostsDeny
  (a subclass, to reach its internals; hostsdeny.py has no public helper for a rewrite): its
  flock on its lock file, its refusals (symlinks, world-writable files), and its in-place
  rewrite (keeping what a lockless appender added meanwhile, rolled back on failure). So tidy,
  the daemon and the CLI never interleave. The store is read while the lock is held, so a ban
  the daemon records before it writes its line is seen as active.
- Bytes are kept as they are: the kept lines are written back from the original bytes, so a
  missing final newline, CRs or undecodable bytes survive. Nothing to remove means no write.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from portsentry.bans.store import BanStore
from portsentry.responders.hostsdeny import HostsDeny, _read_all, _split

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


@dataclass(frozen=True)
class Ownership:
    """Copies of one-line rules we appended ourselves, per text (ban store `owned_lines`)."""

    active: Mapping[str, int] = field(default_factory=dict)  # their ban is in force
    stale: Mapping[str, int] = field(default_factory=dict)  # their ban is over


def _plan(lines: list[str], owned: Ownership) -> tuple[list[int], TidyReport]:
    """Which line indices stay. One-line rules compare as HostsDeny compares (trailing blanks and
    CR ignored), longer rules by their exact lines. Per rule text with k copies, a of them ours
    with an active ban and s ours with a ban that is over: a + (1 if any copy is someone else's)
    stay, the first ones. So our stale copies go, someone else's repeats collapse to one, and a rule someone
    else wrote is never removed altogether, even when it reads exactly like one of ours."""
    active = {text.rstrip(_TRAILING): n for text, n in owned.active.items()}
    stale = {text.rstrip(_TRAILING): n for text, n in owned.stale.items()}
    spans = list(_rules(lines))
    copies: Counter[tuple[str, ...]] = Counter()
    for span in spans:
        text = tuple(lines[i] for i in span)
        if _is_rule(text[0]):
            copies[_key(text)] += 1
    keep_left: dict[tuple[str, ...], int] = {}
    stale_left: dict[tuple[str, ...], int] = {}
    for key, count in copies.items():
        single = key[0] if len(key) == 1 else None
        ours_active = min(active.get(single, 0), count) if single is not None else 0
        ours_stale = min(stale.get(single, 0), count - ours_active) if single is not None else 0
        foreign = count - ours_active - ours_stale
        keep_left[key] = ours_active + (1 if foreign > 0 else 0)
        stale_left[key] = ours_stale
    kept: list[int] = []
    duplicates: list[tuple[int, str]] = []
    expired: list[tuple[int, str]] = []
    for span in spans:
        text = tuple(lines[i] for i in span)
        if not _is_rule(text[0]):
            kept.extend(span)
            continue
        key = _key(text)
        if keep_left[key] > 0:
            keep_left[key] -= 1
            kept.extend(span)
        elif stale_left[key] > 0:
            stale_left[key] -= 1
            expired.extend((i + 1, lines[i]) for i in span)
        else:
            duplicates.extend((i + 1, lines[i]) for i in span)
    return kept, TidyReport(removed_duplicates=duplicates, removed_expired=expired, kept=len(kept))


def _key(text: tuple[str, ...]) -> tuple[str, ...]:
    return (text[0].rstrip(_TRAILING),) if len(text) == 1 else text


def plan_tidy(lines: list[str], owned: Ownership) -> tuple[list[str], TidyReport]:
    """The tidied lines and what went; `lines` without their newlines."""
    kept, report = _plan(lines, owned)
    return [lines[i] for i in kept], report


class _HostsDenyFile(HostsDeny):
    """HostsDeny with one more operation, a whole-file tidy under its lock."""

    def tidy(self, store: BanStore | None, now: float, dry_run: bool) -> TidyReport:
        with self._locked():
            try:
                fd = self._open(os.O_RDWR if not dry_run else os.O_RDONLY, create=False)
            except FileNotFoundError:
                return TidyReport(removed_duplicates=[], removed_expired=[], kept=0)
            try:
                content = _read_all(fd)
                raw = _split(content)
                texts = [r.rstrip(b"\n").decode("utf-8", errors="surrogateescape") for r in raw]
                active, stale = store.owned_lines(now) if store is not None else ({}, {})
                kept, report = _plan(texts, Ownership(active, stale))
                if report.changed and not dry_run:
                    self._rewrite(fd, content, b"".join(raw[i] for i in kept))
            finally:
                os.close(fd)
        if store is not None and report.removed_expired and not dry_run:
            store.forget_lines({text for _, text in report.removed_expired}, now)
        return report


def tidy_hosts_deny(path: str, store: BanStore | None, now: float, dry_run: bool,
                    lock_path: str | None = None) -> TidyReport:
    """Tidy the hosts.deny at `path` (see the module docstring); with dry_run only report.

    Without a store only repeated rules go. Raises HostsDenyError when the file is unsafe to
    rewrite; a missing file is an empty one.
    """
    return _HostsDenyFile(path, lock_path=lock_path).tidy(store, now, dry_run)


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
