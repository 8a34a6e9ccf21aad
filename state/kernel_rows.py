"""Rows of the feature kernel's work buffer: the primitives :mod:`fraudstream.state.kernel`
builds on.

A batch's records live in one float64 work buffer ``W``. Slot ``s`` (one stored record)
has sections (``OFF[s, q]``: where section ``q`` starts, ``NN[s, q]``: its rows) and
scalars ``SC[s]``; the layout of each section is that of :mod:`fraudstream.state.records`.
Sections have room for every row the batch can add, so nothing here allocates.

The compiled code is cached on disk under a directory named by a digest of the sources it
is built from (:func:`fraudstream.state.kernel_cache.cache_dir`).
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit

from fraudstream.state.features import DAY_MS, HOUR_MS, MAX_RECENT, MAX_SEEN
from fraudstream.state.kernel_cache import cache_dir
from fraudstream.state.records import (
    CARD_CODE,
    CARD_HEAD,
    CARD_WIDTHS,
    ENTITY_CODE,
    ENTITY_HEAD,
    ENTITY_WIDTHS,
)

numba.config.CACHE_DIR = cache_dir()

CW = np.array(CARD_WIDTHS, dtype=np.int64)
EW = np.array(ENTITY_WIDTHS + (0,), dtype=np.int64)
# Sections: card REC HRS DAYS MER CTRY DEV; entity REC HRS DAYS FRAUD CARDS.
REC, HRS, DAYS, MER, CTRY, DEV = 0, 1, 2, 3, 4, 5
FRAUD, CARDS = 3, 4
# Per-slot scalars: card LAST MAXTS LOC_TS LOC_LAT LOC_LON; entity LAST LAST_LABEL E_MAXTS.
LAST, MAXTS, LOC_TS, LOC_LAT, LOC_LON = 0, 1, 2, 3, 4
LAST_LABEL, E_MAXTS = 1, 2


@njit(cache=True)
def remove_rows(W, off, n, w, start, count):  # noqa: ANN001, ANN202
    """Remove rows ``start .. start+count-1`` of a section of ``n`` rows of width ``w``."""
    a, b, end = off + start * w, off + (start + count) * w, off + n * w
    for j in range(end - b):
        W[a + j] = W[b + j]


@njit(cache=True)
def open_row(W, off, n, w, pos):  # noqa: ANN001, ANN202
    """Make room for a row at ``pos`` (the rows from ``pos`` on move one down)."""
    a = off + pos * w
    for j in range(off + n * w - 1, a - 1, -1):
        W[j + w] = W[j]


@njit(cache=True)
def after(W, off, n, w, key):  # noqa: ANN001, ANN202
    """The first row of a sorted section whose key is above ``key`` (searched from the end:
    new rows mostly go last)."""
    i = n
    while i and W[off + (i - 1) * w] > key:
        i -= 1
    return i


@njit(cache=True)
def bucket(W, OFF, NN, s, sec, w, idx):  # noqa: ANN001, ANN202
    """Where the bucket ``idx`` starts in ``W`` (created empty if needed, kept sorted)."""
    off, n = OFF[s, sec], NN[s, sec]
    i = after(W, off, n, w, idx)
    if i and W[off + (i - 1) * w] == idx:
        return off + (i - 1) * w
    open_row(W, off, n, w, i)
    p = off + i * w
    W[p] = idx
    for j in range(1, w):
        W[p + j] = 0.0
    NN[s, sec] = n + 1
    return p


@njit(cache=True)
def insert_sorted(W, OFF, NN, s, sec, w, t):  # noqa: ANN001, ANN202
    """Where a new row of time ``t`` goes (after the rows at or before ``t``)."""
    off, n = OFF[s, sec], NN[s, sec]
    i = after(W, off, n, w, t)
    open_row(W, off, n, w, i)
    NN[s, sec] = n + 1
    return off + i * w


@njit(cache=True)
def trim_recent(W, OFF, NN, s, w, keep):  # noqa: ANN001, ANN202
    off, n = OFF[s, REC], NN[s, REC]
    i = 0
    while i < n and W[off + i * w] <= keep:
        i += 1
    if n - i > MAX_RECENT:
        i = n - MAX_RECENT
    if i:
        remove_rows(W, off, n, w, 0, i)
        NN[s, REC] = n - i


@njit(cache=True)
def prune(W, OFF, NN, s, sec, w, first):  # noqa: ANN001, ANN202
    off, n = OFF[s, sec], NN[s, sec]
    i = 0
    while i < n and W[off + i * w] < first:
        i += 1
    if i:
        remove_rows(W, off, n, w, 0, i)
        NN[s, sec] = n - i


@njit(cache=True)
def touch(W, OFF, NN, s, sec, key, ts, horizon):  # noqa: ANN001, ANN202
    """Record ``key`` seen at ``ts``; True when it was not known after ``horizon``. A full
    set forgets its least recently seen entry (the first of them in insertion order)."""
    off, n = OFF[s, sec], NN[s, sec]
    pos = -1
    for j in range(n):
        if W[off + 2 * j] == key:
            pos = j
            break
    if pos >= 0 and W[off + 2 * pos + 1] > horizon:
        if ts > W[off + 2 * pos + 1]:
            W[off + 2 * pos + 1] = ts
        return False
    if n >= MAX_SEEN:
        m = 0
        for j in range(1, n):
            if W[off + 2 * j + 1] < W[off + 2 * m + 1]:
                m = j
        remove_rows(W, off, n, 2, m, 1)
        n -= 1
        if pos == m:
            pos = -1
        elif pos > m:
            pos -= 1
    if pos >= 0:
        W[off + 2 * pos + 1] = ts
    else:
        W[off + 2 * n] = key
        W[off + 2 * n + 1] = ts
        n += 1
    NN[s, sec] = n
    return True


@njit(cache=True)
def count_after(W, OFF, NN, s, sec, after):  # noqa: ANN001, ANN202
    off, c = OFF[s, sec], 0
    for j in range(NN[s, sec]):
        if W[off + 2 * j + 1] > after:
            c += 1
    return c


@njit(cache=True)
def keep_after(W, OFF, NN, s, sec, after):  # noqa: ANN001, ANN202
    """Forget the seen-set entries at or before ``after``, keeping the order."""
    off, n, k = OFF[s, sec], NN[s, sec], 0
    for j in range(n):
        if W[off + 2 * j + 1] > after:
            W[off + 2 * k] = W[off + 2 * j]
            W[off + 2 * k + 1] = W[off + 2 * j + 1]
            k += 1
    NN[s, sec] = k


@njit(cache=True)
def card_expire(W, OFF, NN, SC, s, lateness, ceil_h, ceil_d):  # noqa: ANN001, ANN202
    mx = SC[s, MAXTS]
    trim_recent(W, OFF, NN, s, 4, mx - HOUR_MS - lateness)
    prune(W, OFF, NN, s, HRS, 4, (mx // HOUR_MS) - 23 - ceil_h)
    prune(W, OFF, NN, s, DAYS, 5, (mx // DAY_MS) - 29 - ceil_d)


@njit(cache=True)
def entity_expire(W, OFF, NN, SC, s, lateness, ceil_h, ceil_d):  # noqa: ANN001, ANN202
    mx = SC[s, E_MAXTS]
    trim_recent(W, OFF, NN, s, 1, mx - HOUR_MS - lateness)
    day = mx // DAY_MS
    prune(W, OFF, NN, s, HRS, 3, (mx // HOUR_MS) - 23 - ceil_h)
    prune(W, OFF, NN, s, DAYS, 3, day - 30 - ceil_d)
    if mx:
        prune(W, OFF, NN, s, FRAUD, 2, day - 31 - ceil_d)


@njit(cache=True)
def haversine_km(lat1, lon1, lat2, lon2):  # noqa: ANN001, ANN202
    """As :func:`fraudstream.state.geo.haversine_km`, to the bit. Python's ``x ** 2`` calls
    the C library's ``pow``, which rounds differently from ``x * x`` now and then (1 ulp),
    and LLVM turns a ``pow`` by a constant 2 into ``x * x``; the exponent here is 2 but not
    a constant to LLVM (``0.0 * lat1`` cannot be folded: lat1 might be infinite)."""
    two = 2.0 + 0.0 * lat1
    rad = math.pi / 180.0
    p1, p2 = lat1 * rad, lat2 * rad
    dp, dl = p2 - p1, (lon2 - lon1) * rad
    h = math.pow(math.sin(dp / 2), two) + math.cos(p1) * math.cos(p2) * math.pow(
        math.sin(dl / 2), two)
    return 12_742.0 * math.asin(min(1.0, math.sqrt(h)))


@njit(cache=True)
def put_window(v, i, n, s, mx):  # noqa: ANN001, ANN202
    v[i] = n
    v[i + 1] = s
    v[i + 2] = s / n if n else 0.0
    v[i + 3] = mx


# ---------------------------------------------------------------------------- records


@njit(cache=True)
def load_records(inbuf, rec_start, rec_len, is_card, k):  # noqa: ANN001, ANN202
    """Validate the stored records and lay them out in a work buffer with room for ``k[s]``
    more rows per section. Returns (W, OFF, NN, SC, corrupt)."""
    S = rec_len.size
    NN = np.zeros((S, 6), dtype=np.int64)
    OFF = np.zeros((S, 6), dtype=np.int64)
    SC = np.zeros((S, 5), dtype=np.float64)
    corrupt = np.zeros(S, dtype=np.bool_)
    total = 0
    for s in range(S):
        widths = CW if is_card[s] else EW
        head = CARD_HEAD if is_card[s] else ENTITY_HEAD
        nsec = 6 if is_card[s] else 5
        counts_at = 6 if is_card[s] else 4
        n, a = rec_len[s], rec_start[s]
        if n < 0:
            corrupt[s] = True
        elif n > 0:
            ok = n >= head and inbuf[a] == (CARD_CODE if is_card[s] else ENTITY_CODE)
            size = head
            for q in range(nsec):
                if not ok:
                    break
                c = inbuf[a + counts_at + q]
                if not (c >= 0 and c == math.floor(c) and c <= n):
                    ok = False
                else:
                    NN[s, q] = int(c)
                    size += int(c) * widths[q]
            if not ok or size != n:
                corrupt[s] = True
                NN[s, :] = 0
        for q in range(nsec):
            OFF[s, q] = total
            total += (NN[s, q] + k[s]) * widths[q]
    W = np.empty(total, dtype=np.float64)
    for s in range(S):
        a = rec_start[s]
        if rec_len[s] > 0 and not corrupt[s]:
            if is_card[s]:
                for q in range(5):
                    SC[s, q] = inbuf[a + 1 + q]
                pos, nsec, widths = a + CARD_HEAD, 6, CW
            else:
                for q in range(3):
                    SC[s, q] = inbuf[a + 1 + q]
                pos, nsec, widths = a + ENTITY_HEAD, 5, EW
            for q in range(nsec):
                m = NN[s, q] * widths[q]
                W[OFF[s, q]:OFF[s, q] + m] = inbuf[pos:pos + m]
                pos += m
        else:
            SC[s, LAST] = -1.0
            if is_card[s]:
                SC[s, MAXTS] = 0.0
                SC[s, LOC_TS] = math.nan
                SC[s, LOC_LAT] = math.nan
                SC[s, LOC_LON] = math.nan
            else:
                SC[s, LAST_LABEL] = -1.0
                SC[s, E_MAXTS] = 0.0
    return W, OFF, NN, SC, corrupt


@njit(cache=True)
def store_records(W, OFF, NN, SC, is_card, dirty, lateness, ceil_h, ceil_d):  # noqa: ANN001, ANN202
    """The records of the dirty slots (expired and pruned), concatenated; with each one's
    start and length in float64 values."""
    S = dirty.size
    start = np.zeros(S, dtype=np.int64)
    length = np.zeros(S, dtype=np.int64)
    total = 0
    for s in range(S):
        if not dirty[s]:
            continue
        if is_card[s]:
            card_expire(W, OFF, NN, SC, s, lateness, ceil_h, ceil_d)
            month_ago = SC[s, MAXTS] - 30 * DAY_MS
            for q in (MER, CTRY, DEV):
                keep_after(W, OFF, NN, s, q, month_ago)
            size = CARD_HEAD
            for q in range(6):
                size += NN[s, q] * CW[q]
        else:
            entity_expire(W, OFF, NN, SC, s, lateness, ceil_h, ceil_d)
            keep_after(W, OFF, NN, s, CARDS, SC[s, E_MAXTS] - DAY_MS - lateness)
            size = ENTITY_HEAD
            for q in range(5):
                size += NN[s, q] * EW[q]
        start[s] = total
        length[s] = size
        total += size
    out = np.empty(total, dtype=np.float64)
    for s in range(S):
        if not dirty[s]:
            continue
        p = start[s]
        if is_card[s]:
            out[p] = CARD_CODE
            for q in range(5):
                out[p + 1 + q] = SC[s, q]
            nsec, widths, counts_at, p = 6, CW, p + 6, p + CARD_HEAD
        else:
            out[p] = ENTITY_CODE
            for q in range(3):
                out[p + 1 + q] = SC[s, q]
            nsec, widths, counts_at, p = 5, EW, p + 4, p + ENTITY_HEAD
        for q in range(nsec):
            out[counts_at + q] = NN[s, q]
            m = NN[s, q] * widths[q]
            out[p:p + m] = W[OFF[s, q]:OFF[s, q] + m]
            p += m
    return out, start, length
