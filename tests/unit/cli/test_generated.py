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


def test_bash_completes_commands_and_their_options() -> None:
    script = PACKAGING / "completion" / "portsentry.bash"

    def complete(*words: str) -> list[str]:
        line = " ".join(words)
        done = subprocess.run(["bash", "-c", f'source "{script}"; COMP_WORDS=({line}); '
                               f"COMP_CWORD={len(words) - 1}; _portsentry; "
                               'printf "%s\\n" "${COMPREPLY[@]}"'],
                              capture_output=True, text=True, timeout=30, check=True)
        return done.stdout.split()

    assert complete("portsentry", "li") == ["list"]
    assert complete("portsentry", "list", "--j") == ["--json"]
    assert complete("portsentry", "-at") == ["-atcp"]
    assert "--file" in complete("portsentry", "unblock", "--")
    assert complete("portsentry", "--debian-d") == ["--debian-defaults"]


@pytest.mark.skipif(shutil.which("fish") is None, reason="fish is installed by scripts/setup")
def test_fish_completes_commands_and_their_options() -> None:
    script = PACKAGING / "completion" / "portsentry.fish"

    def complete(line: str) -> list[str]:
        done = subprocess.run(["fish", "--no-config", "-c", f"source {script}; complete -C '{line}'"],
                              capture_output=True, text=True, timeout=30, check=True)
        return [entry.split("\t")[0] for entry in done.stdout.splitlines()]

    assert complete("portsentry li") == ["list"]
    assert "--json" in complete("portsentry list --")


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is installed by scripts/setup")
def test_the_zsh_completion_parses() -> None:
    done = subprocess.run(["zsh", "-n", str(PACKAGING / "completion" / "_portsentry")], capture_output=True,
                          text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
