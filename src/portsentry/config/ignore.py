"""The never-block list: hosts and networks from the ignore file plus this host's own addresses.

Parsing follows 1.2 (leading token of each line, trailing text tolerated, both sides masked
when matching) and adds IPv6 like 2.x; mistakes are reported with file and line, never guessed at.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import TYPE_CHECKING

from portsentry.core.addresses import canonical
from portsentry.core.probe import IPAddress

if TYPE_CHECKING:
    from portsentry.config.settings import Config

IPNetwork = IPv4Network | IPv6Network

# The entry is the first run of non-blank characters; a '#' also ends it, so "10.0.0.1 # gw",
# "10.0.0.1 router" and a trailing CR are all fine, as they were in 1.2.
_TOKEN = re.compile(r"[^\s#]+")
_PREFIX = re.compile(r"[0-9]{1,3}")
_IPV4_MAPPED_BITS = 96
_NETMASK = re.compile(r"[0-9]{1,3}(\.[0-9]{1,3}){3}")
# What separates the entries of a list written on one line ("10.0.0.0/8,192.168.0.0/16").
_LIST_SEPARATOR = re.compile(r"[,;]")
_FORMS = "expected a.b.c.d[/0-32] or an IPv6 address[/0-128]"


class IgnoreFileError(Exception):
    """An ignore file line that is not an address; str() is `file:line: message`."""

    def __init__(self, source: str, line: int, message: str) -> None:
        super().__init__(f"{source}:{line}: {message}")
        self.source = source
        self.line = line
        self.message = message


@dataclass(frozen=True)
class IgnoreEntry:
    """One network from the ignore file (a host is a /32 or /128); `text` is the token as read."""

    network: IPNetwork
    line: int
    text: str


def _parse_token(token: str) -> IPNetwork:
    """Turn one ignore-file token into a network; ValueError carries the user-facing reason."""
    try:
        return _parse_one(token)
    except ValueError as error:
        if _LIST_SEPARATOR.search(token) is None:
            raise
        raise ValueError(f"{error}; one address or network per line") from None


def _parse_one(token: str) -> IPNetwork:
    address_text, slash, prefix_text = token.partition("/")
    if "%" in address_text:
        raise ValueError(f"{token!r} has an IPv6 zone id; ignore entries are plain addresses")
    try:
        address = ip_address(address_text)
    except ValueError:
        raise ValueError(f"{token!r} is not an IP address or network ({_FORMS})") from None
    max_bits = address.max_prefixlen
    if slash:
        if _PREFIX.fullmatch(prefix_text) is None or int(prefix_text) > max_bits:
            hint = "; write /24, not /255.255.255.0" if _NETMASK.fullmatch(prefix_text) else ""
            raise ValueError(
                f"{token!r}: '/{prefix_text}' is not a prefix length (0-{max_bits}){hint}"
            )
        bits = int(prefix_text)
    else:
        bits = max_bits
    # A mapped entry shorter than /96 also covers non-mapped IPv6 space, so it stays IPv6.
    mapped = address.ipv4_mapped if isinstance(address, IPv6Address) else None
    if mapped is not None and bits >= _IPV4_MAPPED_BITS:
        return IPv4Network((mapped, bits - _IPV4_MAPPED_BITS), strict=False)
    # strict=False masks off host bits: 192.168.1.5/24 means 192.168.1.0/24, as 1.2 compared it.
    return ip_network((address, bits), strict=False)


def _host_bits(token: str, network: IPNetwork) -> bool:
    """Whether the address `token` names lies inside `network` but is not its first address."""
    address = ip_address(token.partition("/")[0])
    if isinstance(address, IPv6Address) and network.version == 4:
        address = address.ipv4_mapped or address  # a mapped entry, read as the IPv4 network
    return "/" in token and address != network.network_address


def parse_ignore(text: str, source: str) -> tuple[list[IgnoreEntry], list[str]]:
    """Parse ignore-file text; returns the entries and warnings, raises IgnoreFileError on junk."""
    entries: list[IgnoreEntry] = []
    warnings: list[str] = []
    text = text.removeprefix("\ufeff")
    # split("\n") rather than splitlines() so line numbers agree with editors and `sed -n`.
    for number, line in enumerate(text.split("\n"), start=1):
        stripped = line.lstrip()
        if not stripped or stripped.startswith("#"):
            continue
        match = _TOKEN.match(stripped)
        if match is None:  # only reachable for odd whitespace lstrip() left behind
            continue
        token = match.group()
        try:
            network = _parse_token(token)
        except ValueError as error:
            raise IgnoreFileError(source, number, str(error)) from None
        if network.prefixlen == 0:
            warnings.append(
                f"{source}:{number}: {token!r} matches every IPv{network.version} address; "
                f"no IPv{network.version} host will ever be blocked"
            )
        elif _host_bits(token, network):
            # 1.2 compared under the mask too, so this stays an entry; but a host written with a
            # network's prefix (198.18.7.9/16 for 198.18.7.9/32) silently spares the whole network.
            warnings.append(f"{source}:{number}: {token!r} has host bits set: it means all of "
                            f"{network} (write {network} if that is meant)")
        entries.append(IgnoreEntry(network=network, line=number, text=token))
    return entries, warnings


def load_ignore(path: str) -> tuple[list[IgnoreEntry], list[str]]:
    """Read and parse an ignore file; OSError (missing, unreadable) propagates to the caller."""
    # surrogateescape: stray Latin-1 bytes in a comment must not make the whole file unreadable.
    with open(path, encoding="utf-8", errors="surrogateescape") as handle:
        mode = os.fstat(handle.fileno()).st_mode
        text = handle.read()
    entries, warnings = parse_ignore(text, path)
    if stat.S_ISREG(mode) and mode & stat.S_IWOTH:
        # As with the configuration file: whoever can edit it decides who is never blocked.
        warnings.insert(0, f"{path}: is writable by every user, who could then exempt any address "
                           "from blocking")
    return entries, warnings


class IgnoreList:
    """Answers "never block this address?" in a handful of set lookups, however long the file is."""

    def __init__(self, entries: Iterable[IgnoreEntry], always: Iterable[IPAddress] = ()) -> None:
        entries, always = list(entries), list(always)
        # As networks too, for the kernel's first-probe ban (its protect sets).
        self.networks: tuple[IPv4Network | IPv6Network, ...] = tuple(
            [entry.network for entry in entries]
            # int() drops an IPv6 zone id (fe80::1%eth0), which nft cannot spell.
            + [IPv4Network(int(a)) if a.version == 4 else IPv6Network(int(a))
               for a in map(canonical, always)])
        hosts: dict[int, set[int]] = {4: set(), 6: set()}
        by_prefix: dict[int, dict[int, set[int]]] = {4: {}, 6: {}}
        for entry in entries:
            network = entry.network
            if network.prefixlen == network.max_prefixlen:
                hosts[network.version].add(int(network.network_address))
            else:
                nets = by_prefix[network.version].setdefault(network.prefixlen, set())
                nets.add(int(network.network_address))
        for address in always:
            plain = canonical(address)
            # int() drops any IPv6 zone id, which would otherwise make fe80::1%eth0 != fe80::1.
            hosts[plain.version].add(int(plain))
        self._hosts = {version: frozenset(ints) for version, ints in hosts.items()}
        self._networks: dict[int, tuple[tuple[int, frozenset[int]], ...]] = {}
        for version, groups in by_prefix.items():
            width = 32 if version == 4 else 128
            all_ones = (1 << width) - 1
            self._networks[version] = tuple(
                (all_ones ^ ((1 << (width - bits)) - 1), frozenset(groups[bits]))
                for bits in sorted(groups, reverse=True)
            )
        self._size = sum(len(ints) for ints in self._hosts.values()) + sum(
            len(nets) for groups in self._networks.values() for _, nets in groups
        )

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, IPv4Address | IPv6Address):
            return False
        plain = canonical(address)
        value = int(plain)
        if value in self._hosts[plain.version]:
            return True
        return any(value & mask in nets for mask, nets in self._networks[plain.version])

    def __len__(self) -> int:
        """Distinct networks and hosts held, own addresses included."""
        return self._size


FileKey = tuple[int, int, int, int]


class IgnoreSource:
    """Keeps an IgnoreList current while the daemon runs, so edits to the file take effect live.

    1.2 re-read the file on every event; this stat()s it on every call and re-reads only when it
    changed. Own addresses are re-queried every `min_interval` seconds (DHCP, VPNs).
    After the first load a broken or vanished file never raises: the previous list stays in force
    and `last_error` says why (it is None again after the next good load).
    """

    def __init__(
        self,
        path: str | None,
        local_addresses: Callable[[], Iterable[IPAddress]],
        min_interval: float = 1.0,
    ) -> None:
        self.path = path
        self.min_interval = min_interval
        self.warnings: list[str] = []
        self.note: str | None = None  # open_ignore: which file stands in for IGNORE_FILE, if any
        self._file_error: str | None = None
        self._own_error: str | None = None
        self._local_addresses = local_addresses
        self._entries: list[IgnoreEntry] = []
        self._own: frozenset[IPAddress] = frozenset()
        self._file_key: FileKey | None = None
        self._checked_at: float | None = None
        self._list: IgnoreList | None = None

    def _stat_key(self) -> FileKey | None:
        if self.path is None:
            return None
        info = os.stat(self.path)
        return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)

    def load(self) -> IgnoreList:
        """First load: raises IgnoreFileError or OSError so the daemon can refuse to start."""
        # stat before read: a write racing the read then shows up as a changed key next time.
        key = self._stat_key()
        entries, warnings = load_ignore(self.path) if self.path is not None else ([], [])
        own = frozenset(self._local_addresses())
        self._entries, self.warnings, self._own, self._file_key = entries, warnings, own, key
        self._list = IgnoreList(entries, own)
        self._file_error = self._own_error = None
        return self._list

    @property
    def file_key(self) -> FileKey | None:
        """(dev, ino, size, mtime_ns) of the file as last read or tried, None when it could not
        be stat'ed (the fast lane compares the file with it before each probe it decides)."""
        return self._file_key

    @property
    def last_error(self) -> str | None:
        """Why the list in force is older than the file or the host's addresses, if it is."""
        errors = [error for error in (self._file_error, self._own_error) if error]
        return "; ".join(errors) if errors else None

    def current(self, now: float) -> IgnoreList:
        """The list in force at `now`. The file is looked at on every call (a stat, about a
        microsecond), so an edit counts for the very next packet, as 1.2's re-read at every
        event did; own addresses, a netlink dump, are re-queried at most every `min_interval`."""
        if self._list is None:
            loaded = self.load()
            self._checked_at = now
            return loaded
        changed = self.path is not None and self._reload_file()
        if self._checked_at is None or not 0 <= now - self._checked_at < self.min_interval:
            self._checked_at = now
            try:
                own = frozenset(self._local_addresses())
                self._own_error = None
            except OSError as error:
                self._own_error = f"cannot read this host's addresses: {error}"
                own = self._own
            if own != self._own:
                self._own, changed = own, True
        if changed:
            self._list = IgnoreList(self._entries, self._own)
        return self._list

    def _reload_file(self) -> bool:
        """Re-read the file if its identity changed; True when new entries were taken."""
        assert self.path is not None
        try:
            key = self._stat_key()
        except OSError as error:
            self._file_key = None  # so the file is read again as soon as it reappears
            self._file_error = f"{self.path}: {error.strerror or error}; keeping the previous list"
            return False
        if key == self._file_key:
            return False
        # Remember the key even if parsing fails, so a broken file is not re-parsed every second.
        self._file_key = key
        try:
            entries, warnings = load_ignore(self.path)
        except IgnoreFileError as error:
            self._file_error = f"{error}; keeping the previous list"
            return False
        except (OSError, UnicodeError) as error:
            self._file_error = f"{self.path}: {error}; keeping the previous list"
            return False
        self._entries, self.warnings, self._file_error = entries, warnings, None
        return True


def open_ignore(config: Config, local_addresses: Callable[[], Iterable[IPAddress]]) -> IgnoreSource:
    """The ignore list in force for `config`, loaded; Debian's portsentry.ignore.static when
    IGNORE_FILE is missing (the note is among the source's warnings, so check-config and the
    start both say it). ConfigError naming IGNORE_FILE when it cannot be read; IgnoreFileError
    naming file and line for what it says."""
    from portsentry.config.debian import ignore_file_to_use

    choice = ignore_file_to_use(config.ignore_file)
    source = IgnoreSource(choice.path, local_addresses)
    try:
        source.load()
    except OSError as error:
        raise config.error("IGNORE_FILE", f"cannot read {config.ignore_file}: "
                           f"{error.strerror or error}") from error
    if choice.note is not None:
        source.note = choice.note
        source.warnings = [choice.note, *source.warnings]
    unread = _unread_beside(config)
    if unread is not None:
        source.warnings = [unread, *source.warnings]
    return source


def _unread_beside(config: Config) -> str | None:
    """With IGNORE_FILE unset, the portsentry.ignore beside the configuration file (or in
    /etc/portsentry for the built-in default), said to be unread: the shipped template leaves
    IGNORE_FILE commented out, and 1.2's and Debian's files keep the list there, so an admin
    writes it there and expects it honoured."""
    from portsentry.config.settings import DEFAULT_CONFIG_PATH, EMBEDDED_SOURCE

    if config.ignore_file is not None:
        return None
    conf = DEFAULT_CONFIG_PATH if config.source == EMBEDDED_SOURCE else os.path.abspath(config.source)
    beside = os.path.join(os.path.dirname(conf), "portsentry.ignore")
    if not os.path.isfile(beside):
        return None
    return (f"IGNORE_FILE is not set, so {beside} is not read and its hosts can be blocked "
            f'(IGNORE_FILE="{beside}" uses it)')
