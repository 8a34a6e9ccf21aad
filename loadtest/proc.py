"""Memory and CPU of benchmark processes, from /proc."""

from __future__ import annotations

import os


def rss_kb(pid: int) -> int:
    """VmRSS of ``pid`` in kB (OSError once the process is gone)."""
    return _status_kb(pid, "VmRSS:")


def rss_file_kb(pid: int) -> int:
    """RssFile of ``pid`` in kB: the part of its RSS that is mapped files (shared library
    code such as LLVM's, shared with every process that maps them, and reclaimable)."""
    return _status_kb(pid, "RssFile:")


def _status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _rss_or_0(pid: int) -> int:
    try:
        return rss_kb(pid)
    except OSError:
        return 0


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += _children(p)
    return out


def tree_rss_kb(pid: int) -> int:
    """VmRSS of ``pid`` and all its descendants, in kB (0 once it is gone)."""
    return sum(_rss_or_0(p) for p in _tree(pid))


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by ``pid`` and its living descendants."""
    ticks = 0
    for p in _tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return ticks / os.sysconf("SC_CLK_TCK")
