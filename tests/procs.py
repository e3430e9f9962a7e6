"""Reading the process table from /proc, for tests that must prove the processes they started are gone."""

import os
import signal


def proc_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, session id, state) of every process."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp session ...
        except OSError:
            continue
        table[int(entry)] = (int(fields[1]), int(fields[3]), fields[0])
    return table


def session_pids(sid: int) -> list[int]:
    """Live processes (not zombies) of session `sid`."""
    return [pid for pid, (_, session, state) in proc_table().items() if session == sid and state != "Z"]


def kill_pids(pids) -> None:
    """SIGKILL each pid; one that is already gone is fine."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
