"""The feature kernel: one compiled call per micro-batch, the events in arrival order.

:func:`run_batch` is what :class:`fraudstream.state.engine.FeatureEngine` (the worker, the
offline builder and replay) calls. It takes the batch's stored records (the layout of
:mod:`fraudstream.state.records`) concatenated into one float64 buffer and the events as
columns, and gives back the feature matrix and the changed records, concatenated.

Semantics (windows, lateness, labels, redelivery): see :mod:`fraudstream.state.features`.
The arithmetic is done in the same order as it is written there, so the features do not
depend on the batch size, and the worker and the offline builder give the same bits.

Working memory: each record is copied into one work buffer with room for every row the
batch can add to it (one per event or label of that entity), so nothing grows in the loop.
Numba compiles this on first use (~20 s) and caches the machine code on disk (see
:mod:`fraudstream.state.kernel_rows`; ``NUMBA_CACHE_DIR`` moves that cache); a worker loads
it before its first batch (:func:`fraudstream.state.engine.warm_up`).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from fraudstream.state.features import DAY_MS, HOUR_MS, INDEX, MINUTE_MS
from fraudstream.state.kernel_rows import (
    CARDS,
    CTRY,
    DAYS,
    DEV,
    E_MAXTS,
    FRAUD,
    HRS,
    LAST,
    LAST_LABEL,
    LOC_LAT,
    LOC_LON,
    LOC_TS,
    MAXTS,
    MER,
    REC,
    bucket,
    card_expire,
    count_after,
    entity_expire,
    haversine_km,
    insert_sorted,
    load_records,
    put_window,
    store_records,
    touch,
)

N_FEATURES = len(INDEX)
#: An hour no event has (the merchant sums cache is empty).
_NO_HOUR = -(1 << 62)

I_SECS_PREV = INDEX["card_secs_since_prev"]
I_HAS_PREV = INDEX["card_has_prev"]
I_OVER_MEAN = INDEX["card_amount_over_mean_30d"]
I_ZSCORE = INDEX["card_amount_zscore_30d"]
I_HAS_HISTORY = INDEX["card_has_history_30d"]
I_GEO_KMH = INDEX["card_geo_kmh"]
I_GEO_KNOWN = INDEX["card_geo_known"]
I_FIRST_MERCHANT = INDEX["card_first_merchant"]
I_FIRST_COUNTRY = INDEX["card_first_country"]
I_FIRST_DEVICE = INDEX["card_first_device"]
I_DISTINCT_MERCHANTS = INDEX["card_distinct_merchants_24h"]
I_DISTINCT_COUNTRIES = INDEX["card_distinct_countries_24h"]
I_DISTINCT_DEVICES = INDEX["card_distinct_devices_24h"]
I_LATE = INDEX["event_late"]
I_TOO_LATE = INDEX["event_too_late"]
I_HOUR = INDEX["hour_of_day"]
I_NIGHT = INDEX["is_night"]
I_WEEKEND = INDEX["is_weekend"]
I_HAS_LOC = INDEX["has_location"]
I_HAS_DEVICE = INDEX["has_device"]
I_HAS_IP = INDEX["has_ip"]
I_M_COUNT = (INDEX["merchant_count_1d"], INDEX["merchant_count_7d"],
             INDEX["merchant_count_30d"])
I_M_MEAN = (INDEX["merchant_mean_amount_1d"], INDEX["merchant_mean_amount_7d"],
            INDEX["merchant_mean_amount_30d"])
I_M_FRAUD = (INDEX["merchant_fraud_count_1d"], INDEX["merchant_fraud_count_7d"],
             INDEX["merchant_fraud_count_30d"])
I_M_RATE = (INDEX["merchant_fraud_rate_1d"], INDEX["merchant_fraud_rate_7d"],
            INDEX["merchant_fraud_rate_30d"])
I_SHARED = ((INDEX["device_cards_24h"], INDEX["device_count_1h"]),
            (INDEX["ip_cards_24h"], INDEX["ip_count_1h"]))


# ---------------------------------------------------------------------------- cards


@njit(cache=True)
def _add_card_event(W, OFF, NN, SC, s, v, t, amount, lat, lon, has_loc, has_dev,  # noqa: ANN001, ANN202
                    mtok, ctok, dtok, lateness, ceil_h, ceil_d):
    horizon = SC[s, MAXTS] - 30 * DAY_MS
    v[I_FIRST_MERCHANT] = 1.0 if touch(W, OFF, NN, s, MER, mtok, t, horizon) else 0.0
    v[I_FIRST_COUNTRY] = 1.0 if touch(W, OFF, NN, s, CTRY, ctok, t, horizon) else 0.0
    if has_dev:
        v[I_FIRST_DEVICE] = 1.0 if touch(W, OFF, NN, s, DEV, dtok, t, horizon) else 0.0
    p = insert_sorted(W, OFF, NN, s, REC, 4, t)
    W[p] = t
    W[p + 1] = amount
    W[p + 2] = lat
    W[p + 3] = lon
    p = bucket(W, OFF, NN, s, HRS, 4, t // HOUR_MS)
    W[p + 1] += 1.0
    W[p + 2] += amount
    if amount > W[p + 3]:
        W[p + 3] = amount
    p = bucket(W, OFF, NN, s, DAYS, 5, t // DAY_MS)
    W[p + 1] += 1.0
    W[p + 2] += amount
    W[p + 4] += amount * amount
    if amount > W[p + 3]:
        W[p + 3] = amount
    if has_loc and (math.isnan(SC[s, LOC_TS]) or t >= SC[s, LOC_TS]):
        SC[s, LOC_TS] = t
        SC[s, LOC_LAT] = lat
        SC[s, LOC_LON] = lon
    if t > SC[s, MAXTS]:
        SC[s, MAXTS] = t
    card_expire(W, OFF, NN, SC, s, lateness, ceil_h, ceil_d)


@njit(cache=True)
def _card_windows(W, OFF, NN, SC, s, v, t):  # noqa: ANN001, ANN202
    h, d = t // HOUR_MS, t // DAY_MS
    lo1, lo10, lo60 = t - MINUTE_MS, t - 10 * MINUTE_MS, t - HOUR_MS
    n1 = s1 = m1 = n10 = s10 = m10 = n60 = s60 = m60 = 0.0
    off = OFF[s, REC]
    for j in range(NN[s, REC] - 1, -1, -1):
        ts = W[off + 4 * j]
        if ts > t:
            continue
        if ts <= lo60:
            break
        a = W[off + 4 * j + 1]
        n60 += 1.0
        s60 += a
        if a > m60:
            m60 = a
        if ts > lo10:
            n10 += 1.0
            s10 += a
            if a > m10:
                m10 = a
            if ts > lo1:
                n1 += 1.0
                s1 += a
                if a > m1:
                    m1 = a
    put_window(v, 0, n1, s1, m1)
    put_window(v, 4, n10, s10, m10)
    put_window(v, 8, n60, s60, m60)
    n = sm = mx = 0.0
    off = OFF[s, HRS]
    for j in range(NN[s, HRS] - 1, -1, -1):
        r = off + 4 * j
        k = W[r]
        if k > h:
            continue
        if k < h - 23:
            break
        n += W[r + 1]
        sm += W[r + 2]
        if W[r + 3] > mx:
            mx = W[r + 3]
    put_window(v, 12, n, sm, mx)
    n7 = s7 = m7 = n30 = s30 = m30 = 0.0
    first7, first30 = d - 6, d - 29
    off = OFF[s, DAYS]
    for j in range(NN[s, DAYS] - 1, -1, -1):
        r = off + 5 * j
        k = W[r]
        if k > d:
            continue
        if k < first30:
            break
        n30 += W[r + 1]
        s30 += W[r + 2]
        if W[r + 3] > m30:
            m30 = W[r + 3]
        if k >= first7:
            n7 += W[r + 1]
            s7 += W[r + 2]
            if W[r + 3] > m7:
                m7 = W[r + 3]
    put_window(v, 16, n7, s7, m7)
    put_window(v, 20, n30, s30, m30)
    day_ago = max(float(t - DAY_MS), SC[s, MAXTS] - 30 * DAY_MS)
    v[I_DISTINCT_MERCHANTS] = float(count_after(W, OFF, NN, s, MER, day_ago))
    v[I_DISTINCT_COUNTRIES] = float(count_after(W, OFF, NN, s, CTRY, day_ago))
    v[I_DISTINCT_DEVICES] = float(count_after(W, OFF, NN, s, DEV, day_ago))


@njit(cache=True)
def _update_card(W, OFF, NN, SC, s, v, t, amount, lat, lon, has_dev, mtok, ctok, dtok,  # noqa: ANN001, ANN202
                 add, lateness, ceil_h, ceil_d):
    """Add the event to the card (unless ``add`` is False: delivered again) and write the
    card features into ``v``."""
    has_loc = not math.isnan(lat)
    max_ts = SC[s, MAXTS]
    d = t // DAY_MS
    prev = 0.0
    found = False
    pts = plat = plon = 0.0
    off = OFF[s, REC]
    for j in range(NN[s, REC] - 1, -1, -1):
        r = off + 4 * j
        if W[r] <= t:
            if prev == 0.0:
                prev = W[r]
            if not math.isnan(W[r + 2]):
                found = True
                pts, plat, plon = W[r], W[r + 2], W[r + 3]
                break
    if prev == 0.0 and max_ts != 0.0 and max_ts <= t:
        prev = max_ts
    if prev != 0.0:
        v[I_SECS_PREV] = (t - prev) / 1000.0
        v[I_HAS_PREV] = 1.0
    n30 = s30 = q30 = 0.0
    off = OFF[s, DAYS]
    for j in range(NN[s, DAYS] - 1, -1, -1):
        r = off + 5 * j
        k = W[r]
        if k > d:
            continue
        if k < d - 29:
            break
        n30 += W[r + 1]
        s30 += W[r + 2]
        q30 += W[r + 4]
    if n30:
        mean = s30 / n30
        var = q30 / n30 - mean * mean
        v[I_OVER_MEAN] = amount / mean if mean > 0 else 0.0
        v[I_ZSCORE] = (amount - mean) / math.sqrt(var) if var > 1e-9 else 0.0
        v[I_HAS_HISTORY] = 1.0
    if not found and not math.isnan(SC[s, LOC_TS]) and SC[s, LOC_TS] <= t:
        found = True
        pts, plat, plon = SC[s, LOC_TS], SC[s, LOC_LAT], SC[s, LOC_LON]
    if has_loc and found:
        hours = max((t - pts) / HOUR_MS, 1.0 / 60.0)
        v[I_GEO_KMH] = haversine_km(plat, plon, lat, lon) / hours
        v[I_GEO_KNOWN] = 1.0
    if add:
        _add_card_event(W, OFF, NN, SC, s, v, t, amount, lat, lon, has_loc, has_dev, mtok,
                        ctok, dtok, lateness, ceil_h, ceil_d)
    _card_windows(W, OFF, NN, SC, s, v, t)
    if t < max_ts:
        v[I_LATE] = 1.0
        if t < max_ts - lateness:
            v[I_TOO_LATE] = 1.0


# ---------------------------------------------------------------------------- entities


@njit(cache=True)
def _add_merchant_event(W, OFF, NN, SC, s, t, amount, lateness, ceil_h, ceil_d):  # noqa: ANN001, ANN202
    p = bucket(W, OFF, NN, s, HRS, 3, t // HOUR_MS)
    W[p + 1] += 1.0
    W[p + 2] += amount
    p = bucket(W, OFF, NN, s, DAYS, 3, t // DAY_MS)
    W[p + 1] += 1.0
    W[p + 2] += amount
    if t > SC[s, E_MAXTS]:
        SC[s, E_MAXTS] = t
    entity_expire(W, OFF, NN, SC, s, lateness, ceil_h, ceil_d)


@njit(cache=True)
def _add_shared_event(W, OFF, NN, SC, s, t, card_tok, lateness, ceil_h, ceil_d):  # noqa: ANN001, ANN202
    if t > SC[s, E_MAXTS]:
        SC[s, E_MAXTS] = t
    p = insert_sorted(W, OFF, NN, s, REC, 1, t)
    W[p] = t
    touch(W, OFF, NN, s, CARDS, card_tok, t, -1.0)
    entity_expire(W, OFF, NN, SC, s, lateness, ceil_h, ceil_d)


@njit(cache=True)
def _merchant_sums(W, OFF, NN, group, t, agg):  # noqa: ANN001, ANN202
    """agg = [n 1d, sum 1d, n 7d, sum 7d, n 30d, sum 30d, past n 1d/7d/30d, fraud 1d/7d/30d]
    over the merchant's partials, as of ``t``."""
    h, d = t // HOUR_MS, t // DAY_MS
    n1 = s1 = n7 = s7 = n30 = s30 = p1 = p7 = p30 = f1 = f7 = f30 = 0.0
    for s in group:
        off = OFF[s, HRS]
        for j in range(NN[s, HRS] - 1, -1, -1):
            k = W[off + 3 * j]
            if k > h:
                continue
            if k < h - 23:
                break
            n1 += W[off + 3 * j + 1]
            s1 += W[off + 3 * j + 2]
        off = OFF[s, DAYS]
        for j in range(NN[s, DAYS] - 1, -1, -1):
            r = off + 3 * j
            k = W[r]
            if k > d:
                continue
            if k < d - 30:
                break
            if k == d:
                n7 += W[r + 1]
                s7 += W[r + 2]
                n30 += W[r + 1]
                s30 += W[r + 2]
                continue
            c = W[r + 1]
            p30 += c
            if k >= d - 7:
                p7 += c
                if k == d - 1:
                    p1 += c
            if k >= d - 29:
                n30 += c
                s30 += W[r + 2]
                if k >= d - 6:
                    n7 += c
                    s7 += W[r + 2]
        off = OFF[s, FRAUD]
        for j in range(NN[s, FRAUD] - 1, -1, -1):
            k = W[off + 2 * j]
            if k >= d:
                continue
            if k < d - 30:
                break
            f30 += W[off + 2 * j + 1]
            if k >= d - 7:
                f7 += W[off + 2 * j + 1]
                if k == d - 1:
                    f1 += W[off + 2 * j + 1]
    agg[0], agg[1], agg[2], agg[3], agg[4], agg[5] = n1, s1, n7, s7, n30, s30
    agg[6], agg[7], agg[8], agg[9], agg[10], agg[11] = p1, p7, p30, f1, f7, f30


@njit(cache=True)
def _put_merchant_features(agg, v):  # noqa: ANN001, ANN202
    for k in range(3):
        n, f, past = agg[2 * k], agg[9 + k], agg[6 + k]
        v[I_M_COUNT[k]] = n
        v[I_M_MEAN[k]] = agg[2 * k + 1] / n if n else 0.0
        v[I_M_FRAUD[k]] = f
        v[I_M_RATE[k]] = f / past if past else 0.0


@njit(cache=True)
def _shared_features(W, OFF, NN, SC, group, t, lateness, v, i_cards, i_count):  # noqa: ANN001, ANN202
    hour_ago = t - HOUR_MS
    cards = count = 0
    for s in group:
        day_ago = max(float(t - DAY_MS), SC[s, E_MAXTS] - DAY_MS - lateness)
        cards += count_after(W, OFF, NN, s, CARDS, day_ago)
        off = OFF[s, REC]
        for j in range(NN[s, REC] - 1, -1, -1):
            ts = W[off + j]
            if ts <= hour_ago:
                break
            if ts <= t:
                count += 1
    v[i_cards] = float(cards)
    v[i_count] = float(count)


# ---------------------------------------------------------------------------- a batch


@njit(cache=True, nogil=True)
def run_batch(inbuf, rec_start, rec_len, is_card,  # noqa: ANN001, ANN201, PLR0913
              lab_slot, lab_offset, lab_fraud, lab_day,
              t_ms, amount, lat, lon, offset, card, tokens, own, grp, mkey, n_mkeys,
              grp_ptr, grp_slots, lateness):
    """Features for a batch. Per event ``i``: ``card[i]`` its card's slot, ``own[i, j]`` the
    slot of its own partition's merchant / device / IP partial (-1: no such field),
    ``grp[i, j]`` the group of partials to add up (``grp_slots[grp_ptr[g]:grp_ptr[g+1]]``),
    ``tokens[i]`` = (merchant, country, device, card) tokens, ``mkey[i]`` the merchant's id
    in the batch. Labels (merchant slot, offset, is fraud, day available) come first.

    Returns (X, dirty, out, out_start, out_len, counters), counters = [replayed, late,
    too late, labels counted, corrupt]."""
    S = rec_len.size
    N = t_ms.size
    k = np.zeros(S, dtype=np.int64)
    for i in range(N):
        k[card[i]] += 1
        for j in range(3):
            if own[i, j] >= 0:
                k[own[i, j]] += 1
    for i in range(lab_slot.size):
        k[lab_slot[i]] += 1
    W, OFF, NN, SC, corrupt = load_records(inbuf, rec_start, rec_len, is_card, k)
    ceil_h = -(-lateness // HOUR_MS)
    ceil_d = -(-lateness // DAY_MS)
    dirty = np.zeros(S, dtype=np.bool_)
    counters = np.zeros(5, dtype=np.int64)
    counters[4] = corrupt.sum()

    for i in range(lab_slot.size):
        s = lab_slot[i]
        if lab_offset[i] <= SC[s, LAST_LABEL]:
            continue
        SC[s, LAST_LABEL] = lab_offset[i]
        dirty[s] = True
        if lab_fraud[i]:
            p = bucket(W, OFF, NN, s, FRAUD, 2, lab_day[i])
            W[p + 1] += 1.0
            entity_expire(W, OFF, NN, SC, s, lateness, ceil_h, ceil_d)
            counters[3] += 1

    X = np.zeros((N, N_FEATURES), dtype=np.float64)
    cache_hour = np.full(n_mkeys, _NO_HOUR, dtype=np.int64)
    agg = np.zeros((n_mkeys, 12), dtype=np.float64)
    for i in range(N):
        v = X[i]
        t = t_ms[i]
        a = amount[i]
        hour = (t // HOUR_MS) % 24
        v[I_HOUR] = float(hour)
        v[I_NIGHT] = 1.0 if hour < 6 else 0.0
        v[I_WEEKEND] = 1.0 if (t // DAY_MS + 3) % 7 >= 5 else 0.0  # 1970-01-01: Thu
        v[I_HAS_LOC] = 0.0 if math.isnan(lat[i]) else 1.0
        v[I_HAS_DEVICE] = 1.0 if own[i, 1] >= 0 else 0.0
        v[I_HAS_IP] = 1.0 if own[i, 2] >= 0 else 0.0
        s = card[i]
        fresh = offset[i] > SC[s, LAST]
        _update_card(W, OFF, NN, SC, s, v, t, a, lat[i], lon[i], own[i, 1] >= 0,
                     tokens[i, 0], tokens[i, 1], tokens[i, 2], fresh, lateness, ceil_h,
                     ceil_d)
        if fresh:
            SC[s, LAST] = offset[i]
            dirty[s] = True
        else:
            counters[0] += 1
        counters[1] += v[I_LATE] == 1.0
        counters[2] += v[I_TOO_LATE] == 1.0
        for j in range(3):
            o = own[i, j]
            if o < 0:
                continue
            added = fresh and offset[i] > SC[o, LAST]
            if added:
                if j == 0:
                    _add_merchant_event(W, OFF, NN, SC, o, t, a, lateness, ceil_h, ceil_d)
                else:
                    _add_shared_event(W, OFF, NN, SC, o, t, tokens[i, 3], lateness, ceil_h,
                                      ceil_d)
                SC[o, LAST] = offset[i]
                dirty[o] = True
            g = grp[i, j]
            group = grp_slots[grp_ptr[g]:grp_ptr[g + 1]]
            if j == 0:
                # A merchant's sums change by this event only while the batch stays in one
                # hour: scan its buckets once per hour, then add the events.
                m = mkey[i]
                h = t // HOUR_MS
                if cache_hour[m] == h:
                    if added:
                        agg[m, 0] += 1.0
                        agg[m, 1] += a
                        agg[m, 2] += 1.0
                        agg[m, 3] += a
                        agg[m, 4] += 1.0
                        agg[m, 5] += a
                else:
                    _merchant_sums(W, OFF, NN, group, t, agg[m])
                    cache_hour[m] = h
                _put_merchant_features(agg[m], v)
            else:
                _shared_features(W, OFF, NN, SC, group, t, lateness, v, I_SHARED[j - 1][0],
                                 I_SHARED[j - 1][1])
    out, out_start, out_len = store_records(W, OFF, NN, SC, is_card, dirty, lateness, ceil_h,
                                            ceil_d)
    return X, dirty, out, out_start, out_len, counters
