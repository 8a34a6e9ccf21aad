"""Bearer tokens of ``fraudstream api``: from ``FRAUDSTREAM_API_TOKENS`` and
``FRAUDSTREAM_API_TOKENS_FILE``, each compared in constant time.

The file is read again when it changes (its inode, size or modification time, looked at
at most once every :data:`CHECK_S` seconds, on the request path), so a rotation takes
effect without a restart: write the new token next to the old one, move callers over,
then remove the old one. A Kubernetes Secret mounted as a volume is swapped in place the
same way. A file that cannot be read, or that would leave no token at all, is not taken:
the tokens in force stay, the failure is logged once and counted. A token is never
logged."""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from collections.abc import Callable

log = logging.getLogger("fraudstream.api")

#: How often, at most, the tokens file is looked at for a change (seconds).
CHECK_S = 1.0


def read_tokens_file(path: str) -> list[bytes]:
    """One token per line; blank lines and ``#`` comments skipped. Raises OSError."""
    with open(path, encoding="utf-8") as f:
        return [line.strip().encode() for line in f
                if line.strip() and not line.lstrip().startswith("#")]


def authorized(header: str | None, tokens: list[bytes]) -> bool:
    """A ``Bearer`` header holding one of ``tokens``: every token is compared, each in
    constant time, so the time taken tells nothing of which or how much matched."""
    if not header or not header.startswith("Bearer "):
        return False
    presented = header[7:].strip().encode()
    ok = False
    for token in tokens:
        ok |= hmac.compare_digest(presented, token)
    return ok


class BearerTokens:
    """The tokens in force: ``fixed`` ones (the setting) plus the file's, kept current.

    ``required`` is False only for an anonymous API (no token at start and
    ``FRAUDSTREAM_API_ANONYMOUS``); a file read later never turns authentication off."""

    def __init__(self, fixed: list[bytes], path: str = "", anonymous: bool = False,
                 check_s: float = CHECK_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.fixed = list(fixed)
        self.path = path
        self.check_s = check_s
        self.clock = clock
        self.reloads = 0  # file contents taken after the start
        self.refused = 0  # file changes not taken (unreadable, or no token left)
        self.stale = False  # the file's last change was not taken
        self._seen = self._signature()
        self.tokens = self.fixed + (read_tokens_file(path) if path else [])
        self.required = bool(self.tokens) or not anonymous
        self._next = clock() + check_s
        self._lock = threading.Lock()  # the request path and the metrics scrape both look

    def _signature(self) -> tuple[int, ...] | str:
        try:
            st = os.stat(self.path)
        except OSError as exc:
            return f"{type(exc).__name__}: {exc.strerror}"
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns

    def current(self) -> list[bytes]:
        """The tokens in force, after taking the file's if it changed (thread-safe)."""
        if self.path and self.clock() >= self._next and self._lock.acquire(blocking=False):
            try:
                self._next = self.clock() + self.check_s
                seen = self._signature()
                if seen != self._seen:
                    self._seen = seen
                    self._take()
            finally:
                self._lock.release()
        return self.tokens

    def _take(self) -> None:
        try:
            tokens = self.fixed + read_tokens_file(self.path)
        except (OSError, UnicodeDecodeError) as exc:
            self.refused += 1
            self.stale = True
            log.error("tokens file %s cannot be read (%s): the %d tokens in force stay",
                      self.path, getattr(exc, "strerror", None) or type(exc).__name__,
                      len(self.tokens))
            return
        if not tokens and self.required:
            self.refused += 1
            self.stale = True
            log.error("tokens file %s holds no token: the %d tokens in force stay (an "
                      "API that needs tokens is never left with none)", self.path,
                      len(self.tokens))
            return
        self.stale = False
        if tokens != self.tokens:
            self.reloads += 1
            log.warning("tokens file %s read again: %d tokens in force (%d before)",
                        self.path, len(tokens), len(self.tokens))
            self.tokens = tokens
            self.required = self.required or bool(tokens)

    def file_stale(self) -> bool:
        """Whether the file's last change, looked at now, was not taken."""
        self.current()
        return self.stale

    def authorized(self, header: str | None) -> bool:
        """Whether a request with this ``Authorization`` header may pass."""
        tokens = self.current()
        return not self.required or authorized(header, tokens)
