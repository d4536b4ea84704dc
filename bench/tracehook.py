"""Loaded into our daemon by bench/classic_path.py (never by the daemon itself): wraps the
functions along the classic path (capture read, handle, engine, syslog line, history record, the
block queue, the ban store, the shell) so each call leaves a CLOCK_REALTIME stamp, the clock the
probe's send time and the syslog receiver's kernel stamps are on. The stamps go to a file when
the daemon exits. Imports only the daemon's own modules: it runs inside the daemon process.

Each wrapper costs about a microsecond, once per probe and function; the figures it yields are
the gaps between stamps, not the total.
"""

from __future__ import annotations

import atexit
import functools
import json
import threading
import time
from collections.abc import Callable
from typing import Any

_stamps: list[tuple[int, str, str, str]] = []  # (ns, thread, event, detail)


def stamp(event: str, detail: str = "") -> None:
    _stamps.append((time.time_ns(), threading.current_thread().name, event, detail))


def _wrap(owner: Any, name: str, event: str, detail: Callable[..., str] | None = None,
          after: bool = True, only_if: Callable[[Any], bool] | None = None) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        text = detail(*args, **kwargs) if detail is not None else ""
        stamp(f"{event}>", text)
        result = original(*args, **kwargs)
        if after and (only_if is None or only_if(result)):
            stamp(f"{event}<", text)
        return result

    setattr(owner, name, wrapper)


def _wrapped(function: Callable[..., Any], event: str) -> Callable[..., Any]:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        stamp(f"{event}>")
        result = function(*args, **kwargs)
        stamp(f"{event}<")
        return result
    return wrapper


def install(path: str) -> None:
    import selectors

    from portsentry.bans import store
    from portsentry.config import ignore
    from portsentry.core import engine, guard
    from portsentry.journal import hits, journal, syslog, telemetry
    from portsentry.responders import classic, shell
    from portsentry.sensors import capture, listeners, nflog, stealth
    from portsentry.service import blockqueue, daemon

    def read_batch(original: Callable[..., list[bytes]]) -> Callable[..., list[bytes]]:
        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> list[bytes]:
            batch = original(*args, **kwargs)
            if batch:
                stamp("recv<", str(len(batch)))
            return batch
        return wrapper

    capture.CaptureSocket.read_batch = read_batch(capture.CaptureSocket.read_batch)  # type: ignore[method-assign]
    nflog.NflogCapture.read_batch = read_batch(nflog.NflogCapture.read_batch)  # type: ignore[method-assign]
    _wrap(selectors.EpollSelector, "select", "select", after=True, only_if=bool)
    _wrap(stealth.StealthSensor, "hits_for", "hits_for")
    _wrap(stealth.StealthSensor, "_report_live_ports", "live_ports")
    _wrap(stealth.StealthSensor, "_quiet_busy_udp_ports", "quiet_udp")
    stealth.parse_packet = _wrapped(stealth.parse_packet, "parse")
    _wrap(stealth.HostAddresses, "refresh", "addresses")
    _wrap(listeners.ListeningPorts, "refresh", "listeners")
    _wrap(listeners.ListeningPorts, "confirm", "confirm")
    _wrap(ignore.IgnoreSource, "current", "ignore")
    _wrap(guard.BanGuard, "refusal", "guard")
    _wrap(guard.BanGuard, "rate_limited", "rate")
    _wrap(telemetry.Telemetry, "probe", "telemetry")
    _wrap(hits.HitTally, "add", "tally")
    _wrap(daemon.Daemon, "handle", "handle", after=False)
    _wrap(engine.Engine, "observe", "engine")
    _wrap(journal.Journal, "log", "log", lambda _self, text, *a, **k: text[:60])
    _wrap(syslog.SyslogWriter, "send", "syslog")
    _wrap(journal.Journal, "record", "history")
    _wrap(blockqueue.BlockQueue, "submit", "submit")
    _wrap(daemon.Daemon, "_enforce", "enforce")
    _wrap(store.BanStore, "ban", "store")
    _wrap(classic.ClassicResponder, "carry_out", "carry_out")
    original_init = classic.ClassicResponder.__init__

    @functools.wraps(original_init)
    def init(self: classic.ClassicResponder, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        run = self._run  # bound as a default argument at import: wrap the instance's own

        def traced(command: str, timeout: float) -> shell.CommandResult:
            stamp("run_shell>", command[:40])
            result = run(command, timeout)
            stamp("run_shell<", command[:40])
            return result

        self._run = traced

    classic.ClassicResponder.__init__ = init  # type: ignore[method-assign]
    _wrap(shell.subprocess.Popen, "__init__", "popen", after=True)
    if hasattr(shell, "_spawn"):  # revisions before the posix_spawn change have none
        _wrap(shell, "_spawn", "spawn")

    def dump() -> None:
        with open(path, "w", encoding="utf-8") as out:
            json.dump(_stamps, out)

    atexit.register(dump)
