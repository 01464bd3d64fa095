"""Who owns an audit run (:mod:`skipviz.audit.store`): host, process id and the process's start time, so a
reused pid is not mistaken for the owner. Standard library only."""
from __future__ import annotations

import os
import socket

__all__ = ["current_owner", "owner_alive"]


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, ``/proc/<pid>/stat`` field 22), or ``None``: with
    the pid it tells a live owner from a later process that reused its pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def current_owner() -> dict:
    """This process as a run's owner: host, pid and start time."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid())}


def owner_alive(owner: dict | None) -> bool | None:
    """Whether a run's owning process still runs: ``True``/``False`` on this host, ``None`` when it cannot be
    told (another host, or no owner recorded by an older SkipViz)."""
    if not owner or owner.get("host") != socket.gethostname() or not owner.get("pid"):
        return None
    pid = int(owner["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    start = _process_start(pid)
    return start is None or owner.get("start") is None or start == owner.get("start")
