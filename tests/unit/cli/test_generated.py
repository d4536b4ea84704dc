"""The manual pages and shell completions are generated from the parsers and the key table; the
copies in packaging/ (installed with the wheel) must be what a fresh run produces, every key must
be documented, and the pages must render and the completion complete."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from portsentry.cli import completion, manpages
from portsentry.config.keydocs import DOCS, SECTIONS
from portsentry.config.settings import KEYS

PACKAGING = Path(__file__).resolve().parents[3] / "packaging"


def test_every_key_is_documented_once_and_every_text_has_a_key() -> None:
    placed = [key for _title, keys in SECTIONS for key in keys]
    assert sorted(placed) == sorted(KEYS) and len(placed) == len(set(placed))
    assert set(DOCS) == set(KEYS)


@pytest.mark.parametrize("name", sorted(manpages.PAGES))
def test_the_committed_manual_pages_are_current(name: str) -> None:
    assert (PACKAGING / "man" / name).read_text() == manpages.PAGES[name](), (
        "regenerate: python -m portsentry.cli.manpages packaging/man")


@pytest.mark.parametrize("name", sorted(completion.SCRIPTS))
def test_the_committed_completions_are_current(name: str) -> None:
    assert (PACKAGING / "completion" / name).read_text() == completion.SCRIPTS[name](), (
        "regenerate: python -m portsentry.cli.completion packaging/completion")


def test_the_wheel_installs_every_generated_file_under_the_name_its_reader_looks_for() -> None:
    import tomllib

    project = tomllib.loads((PACKAGING.parent / "pyproject.toml").read_text())
    data = project["tool"]["setuptools"]["data-files"]
    installed = {f"{target}/{Path(source).name}" for target, sources in data.items() for source in sources}
    assert installed == {"share/man/man8/portsentry.8", "share/man/man5/portsentry.conf.5",
                         "share/bash-completion/completions/portsentry",
                         "share/zsh/vendor-completions/_portsentry",
                         "share/fish/vendor_completions.d/portsentry.fish"}
    sources = {source for sources in data.values() for source in sources}
    assert sources == {f"packaging/man/{name}" for name in manpages.PAGES} | {
        f"packaging/completion/{name}" for name in completion.SCRIPTS}


def test_the_conf_page_lists_every_key_with_its_default() -> None:
    page = manpages.conf_page()
    for key in KEYS:
        assert f"\\fB{manpages.escape(key)}\\fR (default: " in page
    assert "\\fBBLOCK_TIME_MAX\\fR (default: 604800)" in page
    assert "\\fBIGNORE_FILE\\fR (default: unset)" in page


@pytest.mark.skipif(shutil.which("man") is None, reason="man-db is installed by scripts/setup")
@pytest.mark.parametrize("name", sorted(manpages.PAGES))
def test_the_pages_render_without_warnings(name: str) -> None:
    done = subprocess.run(["man", "--warnings", "-l", str(PACKAGING / "man" / name)], capture_output=True,
                          text=True, timeout=60, check=False, env={"MANWIDTH": "80", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert "PORTSENTRY" in done.stdout


def _bash_complete(*words: str) -> list[str]:
    """What the generated bash function offers for the command line `words` (the last one being
    completed), run by bash itself the way readline calls it."""
    script = PACKAGING / "completion" / "bash" / "portsentry"
    line = " ".join(f"'{word}'" for word in words)
    done = subprocess.run(["bash", "--norc", "-c", f'source "{script}"; COMP_WORDS=({line}); '
                           f"COMP_CWORD={len(words) - 1}; _portsentry; "
                           'printf "%s\\n" "${COMPREPLY[@]}"'],
                          capture_output=True, text=True, timeout=30, check=True)
    return done.stdout.split()


def test_bash_completes_commands_options_and_their_values(tmp_path) -> None:
    assert _bash_complete("portsentry", "li") == ["list"]
    assert _bash_complete("portsentry", "check") == ["check-config", "check"]
    assert _bash_complete("portsentry", "list", "--j") == ["--json"]
    assert _bash_complete("portsentry", "-at") == ["-atcp"]
    assert "--file" in _bash_complete("portsentry", "unblock", "--")
    assert _bash_complete("portsentry", "--debian-d") == ["--debian-defaults"]
    assert _bash_complete("portsentry", "--mode", "s") == ["stcp", "sudp"]
    assert _bash_complete("portsentry", "report", "--format", "") == ["text", "html", "json", "csv"]
    assert _bash_complete("portsentry", "hosts-deny", "t") == ["tidy"]
    assert _bash_complete("portsentry", "block", "--for", "") == []  # a duration: nothing to offer
    # run/check-config are found after options; admin commands only as the first word (as main()).
    assert _bash_complete("portsentry", "-c", "x.conf", "check-config", "--deb") == ["--debian-defaults"]
    assert _bash_complete("portsentry", "-v", "list", "--j") == ["--journald"]  # not list's --json
    (tmp_path / "default-portsentry").write_text("")
    assert _bash_complete("portsentry", "--debian-defaults", f"{tmp_path}/def") == [
        f"{tmp_path}/default-portsentry"]


def test_completion_offers_what_the_parsers_accept() -> None:
    from portsentry.cli.main import ADMIN_COMMANDS

    table = {command.name: command for command in completion.commands()}
    assert set(ADMIN_COMMANDS) | {"run", "check-config", "demo", ""} == set(table)
    offered = {name for option in table["report"].options for name in option.names}
    assert {"--since", "--format", "-o", "--output", "-c", "--config"} <= offered
    assert {"-tcp", "-udp", "-stcp", "-sudp", "-atcp", "-audp", "--connect", "--stealth"} <= {
        name for option in table[""].options for name in option.names}


@pytest.mark.skipif(shutil.which("fish") is None, reason="fish is installed by scripts/setup")
def test_fish_completes_commands_and_their_options() -> None:
    script = PACKAGING / "completion" / "fish" / "portsentry.fish"

    def complete(line: str) -> list[str]:
        done = subprocess.run(["fish", "--no-config", "-c", f"source {script}; complete -C '{line}'"],
                              capture_output=True, text=True, timeout=30, check=True)
        return [entry.split("\t")[0] for entry in done.stdout.splitlines()]

    assert complete("portsentry li") == ["list"]
    assert "--json" in complete("portsentry list --")
    assert complete("portsentry -at") == ["-atcp"]
    assert complete("portsentry report --format ") == ["csv", "html", "json", "text"]


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is installed by scripts/setup")
def test_zsh_completes_commands_and_their_options() -> None:
    """The script's logic run by zsh, with compadd, _describe and _files standing in for the
    completion system's (they print what would be offered)."""
    script = PACKAGING / "completion" / "zsh" / "_portsentry"
    parsed = subprocess.run(["zsh", "-n", str(script)], capture_output=True, text=True, timeout=30,
                            check=False)
    assert parsed.returncode == 0, parsed.stderr

    def complete(*words: str) -> list[str]:
        stubs = ('compadd() { [[ $1 == -- ]] && shift; print -l -- "$@" }; _files() { print FILES }; '
                 '_describe() { print -l -- ${${(P)4}%%:*} }; ')
        quoted = " ".join(f"'{word}'" for word in words)
        done = subprocess.run(["zsh", "-f", "-c", f"{stubs} words=({quoted}); CURRENT={len(words)}; "
                               f"source {script}"], capture_output=True, text=True, timeout=30, check=True)
        return [word for word in done.stdout.split() if word.startswith(words[-1])]

    assert complete("portsentry", "li") == ["list"]
    assert complete("portsentry", "list", "--j") == ["--json"]
    assert complete("portsentry", "-at") == ["-atcp"]
    assert complete("portsentry", "--mode", "a") == ["atcp", "audp"]
    assert complete("portsentry", "-c", "") == ["FILES"]
    assert complete("portsentry", "hosts-deny", "")[0] == "tidy"


def test_the_readme_key_table_names_real_keys_with_their_defaults() -> None:
    """README's "Keys of ours": every key it names is in the key table, and each default it gives
    is the parser's (as portsentry.conf(5) prints it), so an admin who leaves a key out gets what
    the table said."""
    import re

    readme = (PACKAGING.parent / "README.md").read_text()
    table = readme.partition("| key | default | meaning |")[2].partition("\n\n")[0]
    rows = [line.split("|")[1:3] for line in table.splitlines() if line.startswith("| `")]
    assert len(rows) >= 15
    words = {"on": "1", "off": "0", "7 days": "604800", "": "unset"}
    for key_cell, default_cell in rows:
        keys = re.findall(r"`([A-Z_]+)`", key_cell)
        # "`none` (template: `auto`)", "`0` (forever)": the parser's default is the first word.
        defaults = [words.get(value, value) for value in (
            part.split(" (")[0].strip(" `") for part in default_cell.strip().split(", "))]
        if defaults == ["unset"]:
            defaults *= len(keys)
        assert len(keys) == len(defaults), key_cell
        for key, default in zip(keys, defaults, strict=True):
            assert key in KEYS, key
            assert manpages._default(key) == default, (key, default)
