"""The ipset ban backend for iptables hosts: bans are members of two timeout sets (`portsentry4`,
`portsentry6`) matched by one DROP rule each in iptables and ip6tables, so the packet path costs
one hash lookup however many bans there are, and the kernel expires them.

ipset timeouts are whole seconds up to MAX_TIMEOUT (24.8 days); a longer ban is added without a
timeout and lifted by the daemon at its end, as every ban is: clamped, it would leave the kernel
after 24.8 days while the record still said banned. `-exist` makes add refresh the timeout and
del accept an absent member.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from ipaddress import ip_address
from typing import ClassVar

from portsentry.core.probe import IPAddress
from portsentry.responders.backend import (
    BackendError,
    BanBackend,
    Runner,
    address_text,
    check_timeout,
    run_argv,
    unpacked,
)

IPSET = "ipset"
# The kernel stores ipset timeouts in milliseconds in 32 bits.
MAX_TIMEOUT = 2147483
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,29}")
_CHAIN = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,28}")
# iptables -C: 1 means "no such rule"; anything else but 0 is an error.
_RULE_ABSENT = 1


def seconds(timeout: float | None) -> int:
    """ipset's timeout value: whole seconds rounded up; 0 ("forever") past what ipset can time."""
    timeout = check_timeout(timeout)
    if timeout is None or timeout > MAX_TIMEOUT:
        return 0
    return max(1, math.ceil(timeout - 1e-9))


class IpsetBackend(BanBackend):
    """Bans as ipset members behind one iptables/ip6tables DROP rule per family."""

    name: ClassVar[str] = "ipset"
    families: ClassVar[frozenset[int]] = frozenset({4, 6})
    OPTIONS: ClassVar[frozenset[str]] = frozenset({"set_prefix", "chain", "maxelem"})

    def __init__(
        self,
        set_prefix: str = "portsentry",
        chain: str = "INPUT",
        maxelem: int = 262144,
        runner: Runner = run_argv,
    ) -> None:
        super().__init__(runner)
        if not _NAME.fullmatch(set_prefix):
            raise ValueError(f"ipset set_prefix {set_prefix!r} must be a letter then up to 29 "
                             "letters, digits, '_', '.' or '-'")
        if not _CHAIN.fullmatch(chain):
            raise ValueError(f"iptables chain {chain!r} is not a valid chain name")
        if isinstance(maxelem, bool) or not isinstance(maxelem, int) or maxelem < 1:
            raise ValueError(f"ipset maxelem must be a positive integer, not {maxelem!r}")
        self.set4, self.set6 = f"{set_prefix}4", f"{set_prefix}6"
        self.chain, self.maxelem = chain, maxelem
        self._set_up = False  # set up by this process and not torn down: repair_capture watches

    def _set_for(self, address: IPAddress) -> str:
        address_text(address)
        return self.set4 if address.version == 4 else self.set6

    def _tables(self) -> tuple[tuple[str, str, str], ...]:
        return (("iptables", self.set4, "inet"), ("ip6tables", self.set6, "inet6"))

    def create_argv(self, set_name: str, family: str) -> list[str]:
        return [IPSET, "create", set_name, "hash:ip", "family", family, "timeout", "0",
                "maxelem", str(self.maxelem), "-exist"]

    def rule_argv(self, program: str, action: str, set_name: str) -> list[str]:
        # -w: wait for the xtables lock rather than fail when another tool holds it.
        return [program, "-w", action, self.chain, "-m", "set", "--match-set", set_name, "src",
                "-j", "DROP"]

    def add_argv(self, address: IPAddress, timeout: float | None) -> list[str]:
        return [IPSET, "add", self._set_for(address), address_text(address),
                "timeout", str(seconds(timeout)), "-exist"]

    def remove_argv(self, address: IPAddress) -> list[str]:
        return [IPSET, "del", self._set_for(address), address_text(address), "-exist"]

    def restore_script(self, bans: Iterable[tuple[IPAddress, float | None]]) -> str:
        return "".join(
            f"add {self._set_for(a)} {address_text(a)} timeout {seconds(t)}\n" for a, t in bans
        )

    def _rule_present(self, program: str, set_name: str) -> bool:
        argv = self.rule_argv(program, "-C", set_name)
        result = self.runner(argv, None)
        if result.ok:
            return True
        if result.returncode == _RULE_ABSENT:
            return False
        raise BackendError(f"{' '.join(argv)} exited {result.returncode}: "
                           f"{(result.stderr or result.stdout).strip()}")

    def _existing_sets(self) -> set[str]:
        return set(self.run([IPSET, "list", "-n"]).stdout.split())

    def is_supported(self) -> bool:
        return all(self.probe(argv) for argv in (
            [IPSET, "list", "-n"], ["iptables", "-w", "-S", self.chain],
            ["ip6tables", "-w", "-S", self.chain],
        ))

    def setup(self) -> None:
        for program, set_name, family in self._tables():
            self.run(self.create_argv(set_name, family))
            if not self._rule_present(program, set_name):
                self.run(self.rule_argv(program, "-I", set_name))
        self._set_up = True

    def repair_capture(self) -> bool:
        """Put the sets and DROP rules back when someone removed them: `iptables-restore`
        (netfilter-persistent reload, a firewall script) flushes every chain of the tables it
        loads, and with the rule gone the members block nothing while the store lists them.
        True when it had to (the sets may be new and empty: the bans are then added again)."""
        if not self._set_up:
            return False
        existing = self._existing_sets()
        # `iptables -C` naming a missing set is an error, not "absent": look at the sets first.
        if all(set_name in existing and self._rule_present(program, set_name)
               for program, set_name, _family in self._tables()):
            return False
        self.setup()
        return True

    def add(self, address: IPAddress, timeout: float | None) -> None:
        self.run(self.add_argv(address, timeout))

    def remove(self, address: IPAddress) -> None:
        self.run(self.remove_argv(address))

    def add_many(self, bans: Iterable[tuple[IPAddress, float | None]]) -> None:
        script = self.restore_script(bans)
        if script:
            self.run([IPSET, "restore", "-exist"], script)

    def holds_any(self) -> bool:
        for set_name in (self.set4, self.set6):
            header = self.run([IPSET, "list", "-t", set_name]).stdout
            count = re.search(r"^Number of entries: (\d+)$", header, re.MULTILINE)
            if count is None or int(count.group(1)):
                return True
        return False

    def staging_name(self, set_name: str) -> str:
        """The set replace_all fills before swapping it in (ipset names: at most 31 bytes)."""
        return f"{set_name[:27]}.new"

    def replace_script(self, bans: Iterable[tuple[IPAddress, float | None]]) -> str:
        """replace_all's `ipset restore` input: a staging set per family, made empty, filled,
        swapped with ours (iptables' rule follows the name, so it matches the new members at once)
        and destroyed with the old members."""
        families = ((4, self.set4, "inet"), (6, self.set6, "inet6"))
        staging = {version: self.staging_name(set_name) for version, set_name, _family in families}
        lines = []
        for version, _set_name, family in families:
            # Made if missing, emptied if a replace cut short left it behind.
            lines += [" ".join(self.create_argv(staging[version], family)[1:-1]), f"flush {staging[version]}"]
        for address, timeout in bans:
            lines.append(f"add {staging[address.version]} {address_text(address)} timeout {seconds(timeout)}")
        for version, set_name, _family in families:
            lines += [f"swap {staging[version]} {set_name}", f"destroy {staging[version]}"]
        return "".join(f"{line}\n" for line in lines)

    def replace_all(self, bans: Iterable[tuple[bytes, float | None]]) -> None:
        """Our sets made to hold exactly `bans` (BanBackend.replace_all), each swapped whole for
        a set filled aside: the live one is never empty. A plain add kept members the store no
        longer knows (bans.sqlite3 deleted or restored from a backup), for ever without a
        timeout, invisible to `list`."""
        self.run([IPSET, "restore", "-exist"], self.replace_script((unpacked(p), t) for p, t in bans))

    def members(self) -> dict[IPAddress, float | None]:
        found: dict[IPAddress, float | None] = {}
        for set_name in (self.set4, self.set6):
            argv = [IPSET, "save", set_name]
            found.update(parse_save(self.run(argv).stdout, set_name, " ".join(argv)))
        return found

    def teardown(self) -> str | None:
        # A set that does not exist has no rule either (ipset refuses to destroy a set in use),
        # and `iptables -C` naming a missing set is an error rather than "absent".
        self._set_up = False  # torn down on purpose: repair_capture must not bring it back
        existing = self._existing_sets()
        removed: list[str] = []
        for program, set_name, _family in self._tables():
            if set_name not in existing:
                continue
            # A rule inserted twice (by hand, or by two daemons racing) needs deleting twice.
            rules = 0
            for _ in range(100):
                if not self._rule_present(program, set_name):
                    break
                self.run(self.rule_argv(program, "-D", set_name))
                rules += 1
            self.run([IPSET, "destroy", set_name])
            removed.append(f"set {set_name}" + (
                f" and {rules} {program} rule{'s' if rules != 1 else ''}" if rules else ""))
        return ", ".join(removed) or None

    def owned(self) -> str:
        return f"ipset sets {self.set4}/{self.set6}"

    def describe(self) -> str:
        return (f"ipset: sets {self.set4}/{self.set6} (maxelem {self.maxelem}) matched by one "
                f"DROP rule each in iptables/ip6tables {self.chain}")


def parse_save(text: str, set_name: str, source: str = "ipset save") -> dict[IPAddress, float | None]:
    """Members of `set_name` from `ipset save` output: address -> seconds left (None = forever)."""
    found: dict[IPAddress, float | None] = {}
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split()
        if len(words) < 3 or words[0] != "add" or words[1] != set_name:
            continue
        try:
            address = ip_address(words[2])
        except ValueError as exc:
            raise BackendError(f"{source}: line {number}: {words[2]!r} is not an address") from exc
        left: float | None = None
        if "timeout" in words[3:]:
            value = words[words.index("timeout", 3) + 1 : words.index("timeout", 3) + 2]
            if not value or not value[0].isdigit():
                raise BackendError(f"{source}: line {number}: bad timeout in {line!r}")
            left = float(value[0]) or None
        found[address] = left
    return found
