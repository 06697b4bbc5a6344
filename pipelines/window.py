"""Data windows over dated partitions, the idempotency key, and the single-run lock.

A partition is one file; its date comes from the first ``YYYY-MM-DD`` (or ``YYYYMMDD``) in
its name or, failing that, in its parent directory's name (``data/dt=2026-01-01.parquet``,
``data/dt=2026-01-01/part-0.parquet``). Windows are relative to the newest partition (or
``end``), never to today's date, so the same files always give the same window.
"""
from __future__ import annotations

import datetime as dt
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

from anomaly_vae.errors import ConfigError, DataError, LockedError  # noqa: F401 (LockedError re-exported)
from anomaly_vae.io import expand_inputs

log = logging.getLogger(__name__)
_DATE = re.compile(r"(?<!\d)(\d{4})-?(\d{2})-?(\d{2})(?!\d)")


class Partition(NamedTuple):
    path: Path
    date: dt.date | None
    size: int
    mtime_ns: int

    @property
    def label(self) -> str:
        """parent/name: what identifies the file in the idempotency key and in logs."""
        return f"{self.path.parent.name}/{self.path.name}"


def partition_date(path: str | os.PathLike) -> dt.date | None:
    """The date in a partition's file name (else its directory name), or None."""
    p = Path(path)
    for text in (p.name, p.parent.name):
        for m in _DATE.finditer(text):
            try:
                return dt.date(int(m[1]), int(m[2]), int(m[3]))
            except ValueError:
                continue
    return None


def list_partitions(source: Sequence[str | os.PathLike]) -> list[Partition]:
    """Files under ``source`` (files, directories, globs), oldest first.

    Sorted by date when every file has one, otherwise by path. DataError when nothing matches.
    """
    parts = []
    for p in expand_inputs(list(source)):
        st = p.stat()
        parts.append(Partition(p, partition_date(p), st.st_size, st.st_mtime_ns))
    if all(p.date is not None for p in parts):
        return sorted(parts, key=lambda p: (p.date, str(p.path)))
    return sorted(parts, key=lambda p: str(p.path))


def select_window(parts: Sequence[Partition], *, days: int | None = None, files: int | None = None,
                  end: dt.date | None = None) -> list[Partition]:
    """The last ``days`` days (by partition date) or the last ``files`` files, up to ``end``.

    ``days`` and ``end`` need a date in every file name. Raises ConfigError for bad options and
    DataError when the window is empty.
    """
    if days is not None and files is not None:
        raise ConfigError("give either a window in days or in files, not both")
    if (days is not None and days < 1) or (files is not None and files < 1):
        raise ConfigError(f"window must be at least 1 day/file, got days={days} files={files}")
    parts = list(parts)
    if days is not None or end is not None:
        undated = [p.label for p in parts if p.date is None]
        if undated:
            raise DataError(f"{undated[0]}: no date (YYYY-MM-DD) in the file or directory name; "
                            "name partitions like dt=2026-01-01.parquet or use --files N")
    if end is not None:
        parts = [p for p in parts if p.date <= end]
    if days is not None and parts:
        last = end or max(p.date for p in parts)
        first = last - dt.timedelta(days=days - 1)
        parts = [p for p in parts if first <= p.date <= last]
    if files is not None:
        parts = parts[-files:]
    if not parts:
        raise DataError(f"no partitions in the window (days={days}, files={files}, end={end})")
    return parts


def window_key(parts: Sequence[Partition], config: dict[str, Any]) -> str:
    """sha256 over each file's parent/name, size and mtime plus the run's decision config.

    Same files (unchanged on disk) and same config -> same key; touching or rewriting a file,
    or changing any option that affects training or the gates, gives a new key.
    """
    payload = {"files": [[p.label, p.size, p.mtime_ns] for p in parts], "config": config}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        return "unknown process"
    return text or "unknown process"


@contextmanager
def run_lock(path: str | os.PathLike, *, wait: bool = False, timeout: float = 3600.0,
             poll: float = 0.2) -> Iterator[Path]:
    """Hold an exclusive ``fcntl.flock`` on ``path`` for the duration of the block.

    Non-blocking by default: raises LockedError at once when another process holds it. With
    ``wait`` it retries every ``poll`` seconds for up to ``timeout`` seconds, then raises
    LockedError. The lock file keeps the holder's pid and start time (informational); it is
    never deleted, so there is no unlink race. The OS drops the lock if the holder dies.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                if not wait:
                    raise LockedError(f"another retrain holds the lock {path} ({_holder(path)}); "
                                      "try again later or pass --wait") from None
                if time.monotonic() >= deadline:
                    raise LockedError(f"gave up after waiting {timeout:g} s for the lock {path} "
                                      f"({_holder(path)})") from None
                time.sleep(poll)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} since {dt.datetime.now().isoformat(timespec='seconds')}\n".encode())
        log.debug("acquired lock %s", path)
        yield path
    finally:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
