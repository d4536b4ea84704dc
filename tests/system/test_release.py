"""Release artefacts (issue 14): `python -m build` makes a wheel and an sdist; the wheel, installed
into a fresh venv, runs and carries the manual pages and shell completions where man and
bash-completion look for them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from portsentry import __version__

pytestmark = [pytest.mark.system]

REPO = Path(__file__).resolve().parents[2]
INSTALLED_DATA = ("share/man/man8/portsentry.8", "share/man/man5/portsentry.conf.5",
                  "share/bash-completion/completions/portsentry",
                  "share/zsh/vendor-completions/_portsentry",
                  "share/fish/vendor_completions.d/portsentry.fish")


def test_the_wheel_installs_into_a_fresh_venv_with_its_pages_and_completions(tmp_path: Path) -> None:
    for tool in ("man", "bash"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is installed by scripts/setup")
    dist = tmp_path / "dist"
    argv = [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(REPO)]
    built = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    wheels = list(dist.glob("portsentry-*.whl"))
    sdists = list(dist.glob("portsentry-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, list(dist.iterdir())
    assert wheels[0].name.startswith(f"portsentry-{__version__}-")  # the version lives in one place
    assert sdists[0].name == f"portsentry-{__version__}.tar.gz"

    venv = tmp_path / "venv"
    # Without PYTHONPATH: a source tree on it (with the egg-info the build just wrote) would make
    # pip take portsentry for installed already and install nothing.
    fresh = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120, env=fresh)
    # --no-deps: prometheus-client is imported only when METRICS_LISTEN is set; nothing is fetched.
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-deps", "--no-index", str(wheels[0])],
                   check=True, timeout=120, env=fresh)
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "MANWIDTH": "80"}
    version = subprocess.run([str(venv / "bin" / "portsentry"), "--version"], capture_output=True, text=True,
                             timeout=60, check=True, env=env)
    assert version.stdout.strip() == f"portsentry {__version__}"
    conf = tmp_path / "portsentry.conf"
    conf.write_text(f'TCP_PORTS="1,79"\nIGNORE_FILE="{tmp_path}/ignore"\nSTATE_DIR="{tmp_path}/state"\n')
    (tmp_path / "ignore").write_text("127.0.0.1\n")
    checked = subprocess.run([str(venv / "bin" / "portsentry"), "check-config", "-c", str(conf), "-stcp"],
                             capture_output=True, text=True, timeout=60, check=False, env=env)
    assert checked.returncode == 0 and "configuration OK" in checked.stdout, checked.stderr
    for installed in INSTALLED_DATA:
        assert (venv / installed).is_file(), installed

    # man finds the pages from PATH (venv/bin -> venv/share/man) and renders them.
    for page, needle in (("portsentry", "--debian-defaults"), ("portsentry.conf", "KERNEL_BAN")):
        where = subprocess.run(["man", "-w", page], capture_output=True, text=True, timeout=60, env=env)
        assert where.stdout.strip().startswith(str(venv / "share" / "man")), where.stdout + where.stderr
        shown = subprocess.run(["man", page], capture_output=True, text=True, timeout=60, env=env)
        assert shown.returncode == 0 and needle in shown.stdout, shown.stderr

    # bash-completion's loader finds the script among XDG_DATA_DIRS and it completes a command.
    loader = Path("/usr/share/bash-completion/bash_completion")
    if not loader.is_file():
        pytest.fail("bash-completion is installed by scripts/setup")
    script = (f"source {loader}; __load_completion portsentry || exit 7; complete -p portsentry; "
              "COMP_WORDS=(portsentry rep); COMP_CWORD=1; _portsentry; echo \"offered: ${COMPREPLY[*]}\"")
    done = subprocess.run(["bash", "--norc", "--noprofile", "-c", script], capture_output=True, text=True,
                          timeout=60, env={**env, "XDG_DATA_DIRS": str(venv / "share")})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "complete -F _portsentry portsentry" in done.stdout, done.stdout
    assert "offered: report" in done.stdout, done.stdout
