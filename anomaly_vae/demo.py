"""Synthetic card/payment transactions with injected fraud patterns (deterministic by seed).

Normal behaviour: per-customer home country, age and tenure; merchant categories with their
own log-normal amount scale, channel mix and hour-of-day profile; card_present follows the
channel; distance from home is small for POS/ATM. Fraud (label 1, ~1.5% by default) comes in
four kinds, each breaking a different relation:
  amount_spike   amount 8-40x the category's typical amount
  foreign_cnp    foreign country, card not present, online, 0-5 am, new-ish account
  rare_combo     ATM cash-out abroad far from home, at a category/country pair never seen
  velocity       a burst of mid-size electronics purchases (high txn_count_1h)
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

CATEGORIES = {  # name: (median amount, log-sd, weight, channel probs pos/online/atm, hour profile)
    "grocery":       (45.0, 0.6, 0.22, (0.92, 0.08, 0.0), "day"),
    "restaurant":    (38.0, 0.5, 0.15, (0.85, 0.15, 0.0), "evening"),
    "fuel":          (55.0, 0.35, 0.10, (1.0, 0.0, 0.0), "day"),
    "online_retail": (70.0, 0.9, 0.16, (0.0, 1.0, 0.0), "any"),
    "electronics":   (220.0, 0.8, 0.05, (0.5, 0.5, 0.0), "day"),
    "travel":        (420.0, 0.7, 0.04, (0.2, 0.8, 0.0), "any"),
    "pharmacy":      (28.0, 0.6, 0.07, (0.95, 0.05, 0.0), "day"),
    "entertainment": (60.0, 0.7, 0.07, (0.5, 0.5, 0.0), "evening"),
    "utilities":     (110.0, 0.4, 0.04, (0.0, 1.0, 0.0), "day"),
    "cash":          (120.0, 0.6, 0.10, (0.0, 0.0, 1.0), "day"),
}
HOME_COUNTRIES = {"US": 0.55, "GB": 0.15, "DE": 0.12, "FR": 0.10, "CA": 0.08}
FOREIGN = ["NG", "RU", "BR", "CN", "RO", "VN"]
HOUR_PROFILES = {
    "day": np.r_[np.full(7, 0.2), np.full(5, 3.0), np.full(6, 3.5), np.full(4, 1.5), np.full(2, 0.5)],
    "evening": np.r_[np.full(7, 0.2), np.full(4, 0.8), np.full(4, 2.0), np.full(3, 2.0), np.full(4, 4.0), np.full(2, 1.5)],
    "any": np.r_[np.full(7, 0.6), np.full(17, 1.5)],
}


def make_transactions(n_rows: int = 100_000, fraud_rate: float = 0.015, seed: int = 0,
                      start: str = "2026-01-01", days: int = 30) -> pd.DataFrame:
    """Return a DataFrame of `n_rows` transactions with a `label` column (1 = fraud)."""
    rng = np.random.default_rng(seed)
    n_customers = max(n_rows // 20, 10)
    cust_country = rng.choice(list(HOME_COUNTRIES), n_customers, p=list(HOME_COUNTRIES.values()))
    cust_age = np.clip(rng.normal(44, 14, n_customers), 18, 95).round()
    cust_tenure = np.clip(rng.gamma(2.0, 30, n_customers), 0, 480).round()
    names = list(CATEGORIES)
    weights = np.array([CATEGORIES[c][2] for c in names])
    cust = rng.integers(0, n_customers, n_rows)
    cat_idx = rng.choice(len(names), n_rows, p=weights / weights.sum())
    category = np.array(names, dtype=object)[cat_idx]

    amount = np.empty(n_rows)
    channel = np.empty(n_rows, dtype=object)
    hour = np.empty(n_rows)
    for i, name in enumerate(names):
        med, sd, _, chan_p, prof = CATEGORIES[name]
        m = cat_idx == i
        k = int(m.sum())
        amount[m] = np.exp(np.log(med) + sd * rng.standard_normal(k))
        channel[m] = rng.choice(["pos", "online", "atm"], k, p=chan_p)
        p = HOUR_PROFILES[prof] / HOUR_PROFILES[prof].sum()
        hour[m] = rng.choice(24, k, p=p) + rng.random(k)
    amount = np.round(amount, 2)
    day = rng.integers(0, days, n_rows)
    ts = pd.Timestamp(start) + pd.to_timedelta(day * 86400 + hour * 3600, unit="s")

    country = cust_country[cust].astype(object)
    travel = rng.random(n_rows) < 0.03                 # legit travel: another home-list country
    country[travel] = rng.choice(list(HOME_COUNTRIES), int(travel.sum()))
    card_present = channel != "online"
    distance = np.where(channel == "online", np.nan, rng.gamma(1.5, 4.0, n_rows))
    distance[travel & card_present] = rng.gamma(3.0, 300.0, int((travel & card_present).sum()))
    velocity = rng.poisson(0.6, n_rows)
    age = cust_age[cust].copy()
    tenure = cust_tenure[cust].copy()
    age[rng.random(n_rows) < 0.04] = np.nan             # some profiles lack age / tenure
    tenure[rng.random(n_rows) < 0.02] = np.nan

    label = np.zeros(n_rows, dtype=np.int64)
    fraud_type = np.full(n_rows, "", dtype=object)
    n_fraud = int(round(fraud_rate * n_rows))
    idx = rng.choice(n_rows, n_fraud, replace=False)
    kinds = rng.choice(["amount_spike", "foreign_cnp", "rare_combo", "velocity"], n_fraud)
    for j, kind in zip(idx, kinds):
        label[j], fraud_type[j] = 1, kind
        if kind == "amount_spike":
            amount[j] = round(amount[j] * rng.uniform(8, 40), 2)
        elif kind == "foreign_cnp":
            country[j] = rng.choice(FOREIGN)
            channel[j], card_present[j], distance[j] = "online", False, np.nan
            category[j] = rng.choice(["online_retail", "electronics", "travel"])
            tenure[j] = rng.integers(0, 6)
            ts_j = ts[j].normalize() + pd.Timedelta(hours=float(rng.uniform(0, 5)))
            ts = ts.where(np.arange(n_rows) != j, ts_j)
        elif kind == "rare_combo":
            category[j], channel[j], card_present[j] = "cash", "atm", True
            country[j] = rng.choice(FOREIGN)
            distance[j] = rng.uniform(2000, 9000)
            amount[j] = round(float(rng.uniform(300, 900)), 2)
        else:  # velocity burst
            category[j], channel[j] = "electronics", rng.choice(["pos", "online"])
            card_present[j] = channel[j] == "pos"
            distance[j] = np.nan if channel[j] == "online" else rng.gamma(1.5, 4.0)
            velocity[j] = rng.integers(8, 25)
            amount[j] = round(float(rng.uniform(150, 600)), 2)

    df = pd.DataFrame({
        "transaction_id": [f"tx{seed:02d}{i:09d}" for i in range(n_rows)],
        "timestamp": ts.values,
        "customer_id": cust.astype(np.int64),
        "amount": amount,
        "merchant_category": pd.Series(category, dtype="string"),
        "channel": pd.Series(channel, dtype="string"),
        "country": pd.Series(country, dtype="string"),
        "card_present": card_present.astype(bool),
        "customer_age": age,
        "customer_tenure_months": tenure,
        "distance_from_home_km": np.round(distance, 2),
        "txn_count_1h": velocity.astype(np.int64),
        "label": label,
        "fraud_type": pd.Series(fraud_type, dtype="string"),
    })
    return df.sort_values("timestamp", kind="stable").reset_index(drop=True)


DEMO_EXCLUDE = ("customer_id", "fraud_type")   # high-cardinality key and the answer key


# ---------------------------------------------------------------- wide table (throughput benchmark)
# Named columns of the 20-column layout; wider tables add generic num_*/cat_*/flag_* columns.
WIDE_NUMERIC = ("amount", "customer_age", "account_tenure_days", "balance", "txn_count_24h",
                "distance_km", "merchant_risk", "device_score", "session_seconds", "items")
WIDE_CATEGORICAL = {"channel": 3, "device_type": 6, "currency": 12, "merchant_category": 20,
                    "country": 28, "city": 60}          # name: number of distinct values
WIDE_BOOLEAN = ("card_present", "is_international")
_WIDE_SEGMENTS = 8          # latent customer segments that tie the columns together
_WIDE_STRUCTURE_SEED = 20260101   # fixed: every seed draws rows from the same distribution


def wide_layout(width: int) -> tuple[int, int, int]:
    """(numeric, categorical, boolean) column counts of a `width`-column wide table: one id and
    one timestamp, then the other width - 2 columns split 10 : 6 : 2 (width 20 gives 10, 6, 2)."""
    if width < 3:
        raise ValueError(f"width must be >= 3 (id, timestamp and one feature), got {width}")
    rest = width - 2
    n_bool = int(round(rest * 2 / 18))
    n_cat = int(round(rest * 6 / 18))
    return rest - n_cat - n_bool, n_cat, n_bool


def make_wide_transactions(n_rows: int, width: int = 20, seed: int = 0,
                           start: str = "2026-01-01", days: int = 30) -> pd.DataFrame:
    """A wide mixed-type transaction table of `n_rows` rows and `width` columns (no label).

    Width 20: transaction_id (unique string), timestamp, 10 numeric columns (lognormal
    `amount`, `customer_age` with 3% missing, counts, rates, durations), 6 string categoricals
    with 3, 6, 12, 20, 28 and 60 values, 2 booleans; other widths keep the 10 : 6 : 2 split
    (`wide_layout`). Rows depend on a latent customer segment, so columns are related (amount,
    categories and hours shift with the segment). The distribution is the same for every seed;
    `seed` draws the rows (and prefixes the ids), so chunks generated with seeds 0, 1, ... form
    one larger table. Vectorised (a few seconds per million rows).
    """
    n_num, n_cat, n_bool = wide_layout(width)
    rng = np.random.default_rng(seed)
    struct = np.random.default_rng(_WIDE_STRUCTURE_SEED)
    seg = rng.choice(_WIDE_SEGMENTS, n_rows, p=np.arange(1, _WIDE_SEGMENTS + 1)[::-1] / 36.0)
    seg_level = struct.normal(0.0, 1.0, (_WIDE_SEGMENTS, max(n_num, 1)))
    cols: dict[str, object] = {"transaction_id": _wide_ids(n_rows, seed)}
    hour = (struct.uniform(8, 20, _WIDE_SEGMENTS)[seg] + rng.normal(0, 3.0, n_rows)) % 24
    day = rng.integers(0, days, n_rows)
    cols["timestamp"] = (pd.Timestamp(start) + pd.to_timedelta(day * 86400 + np.round(hour * 3600), unit="s")).values
    noise = rng.standard_normal((n_rows, max(n_num, 1)))
    for j in range(n_num):
        lvl, e = seg_level[seg, j], noise[:, j]
        name = WIDE_NUMERIC[j] if j < len(WIDE_NUMERIC) else f"num_{j:02d}"
        cols[name] = _wide_numeric(j, lvl, e, rng)
    sizes = list(WIDE_CATEGORICAL.values())
    names = list(WIDE_CATEGORICAL)
    codes_0 = None
    for j in range(n_cat):
        k = sizes[j] if j < len(sizes) else 3 + (j * 17) % 58
        name = names[j] if j < len(names) else f"cat_{j:02d}"
        weights = 1.0 / np.arange(1, k + 1) ** 0.8
        shift = struct.integers(0, k, _WIDE_SEGMENTS)          # segment-specific favourites
        codes = (rng.choice(k, n_rows, p=weights / weights.sum()) + shift[seg]) % k
        codes_0 = codes if codes_0 is None else codes_0
        values = pa.array([f"{name[:3]}_{v:02d}" for v in range(k)], type=pa.string())
        cols[name] = pd.Series(pd.arrays.ArrowStringArray(
            pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int32)), values).cast(pa.string())),
            dtype="string")
    for j in range(n_bool):
        name = WIDE_BOOLEAN[j] if j < len(WIDE_BOOLEAN) else f"flag_{j:02d}"
        if j == 0 and codes_0 is not None:     # card present follows the first categorical (channel)
            p = np.where(codes_0 == 1, 0.02, 0.95)
        else:
            p = 0.03 + 0.25 * (seg == _WIDE_SEGMENTS - 1) + 0.02 * j
        cols[name] = rng.random(n_rows) < p
    return pd.DataFrame(cols)


def _wide_numeric(j: int, level: np.ndarray, e: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The j-th numeric column from its segment level and standard-normal noise (n,)."""
    kind = j % 10
    if kind == 0:                                  # amount: lognormal, segment sets its scale
        return np.round(np.exp(3.5 + 0.6 * level + 0.8 * e), 2)
    if kind == 1:                                  # age: 3% missing
        age = np.clip(np.round(45 + 8 * level + 12 * e), 18, 95)
        age[rng.random(len(e)) < 0.03] = np.nan
        return age
    if kind in (2, 8):                             # durations: lognormal, longer tails
        return np.round(np.exp(5.0 + 0.5 * level + 1.0 * e), 1)
    if kind == 3:                                  # balance: related to the amount's level
        return np.round(np.exp(7.0 + 0.8 * level + 0.7 * e), 2)
    if kind in (4, 9):                             # counts
        return rng.poisson(np.exp(0.5 + 0.4 * level + 0.3 * e)).astype(np.int64)
    if kind == 5:                                  # distance: gamma-like, skewed
        return np.round(np.exp(1.5 + 0.7 * level + 1.1 * e), 2)
    if kind == 6:                                  # a rate in (0, 1)
        return np.round(1.0 / (1.0 + np.exp(-(level + 0.8 * e))), 4)
    return np.round(level + e, 4)                  # scores: Gaussian around the segment level


def _wide_ids(n_rows: int, seed: int) -> pd.Series:
    """Unique string ids 'w<seed>-<row>' built with Arrow kernels (no per-row Python)."""
    import pyarrow.compute as pc

    num = pc.utf8_lpad(pa.array(np.arange(n_rows, dtype=np.int64)).cast(pa.string()), 10, padding="0")
    ids = pc.binary_join_element_wise(pa.scalar(f"w{seed:03d}"), num, "-")
    return pd.Series(pd.arrays.ArrowStringArray(ids), dtype="string")


if __name__ == "__main__":  # python -m anomaly_vae.demo [n_rows] [path]
    import sys
    from pathlib import Path
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    out = Path(sys.argv[2] if len(sys.argv) > 2 else "data/transactions.parquet")
    out.parent.mkdir(parents=True, exist_ok=True)
    make_transactions(n).to_parquet(out, index=False)
    print(f"wrote {n:,} rows to {out}")
