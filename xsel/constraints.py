"""Selection constraints, applied by the framework around any selector (the site's ONNX one included).

Two kinds:

- **Pool rules** shrink the pool before the selector runs: one image per patient (default) or per study, and
  ``dedup`` — near-duplicates (cosine similarity of the embeddings at or above a threshold; identical pixels give
  identical embeddings, so exact copies are always caught) are grouped and only each group's first image in store
  order stays. Groups are reported.
- **Strata** split K over the values of metadata columns: ``balance`` (equal shares per combination of the
  columns' values) and ``quotas`` (``View=PA:0.7``: a share of K for one value; the rest of the column's values
  share what remains). Each stratum's share is picked by the selector from that stratum's pool, so every selector
  honours them; a stratum too small for its share gives what it has and the shortfall goes to the others, and
  the report says so. ``AgeBand`` is derived from ``Age`` (years) for age quotas and balance.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from xsel.errors import InputError
from xsel.geometry import unit_rows

ONE_PER = ("patient", "study", "image")
UNIT_COLUMNS = {"patient": "PatientID", "study": "StudyInstanceUID"}
AGE_BAND = "AgeBand"
AGE_BANDS = ((0, 18, "0-17"), (18, 40, "18-39"), (40, 60, "40-59"), (60, 80, "60-79"), (80, 200, "80+"))
UNKNOWN = "(blank)"
DEDUP_BLOCK = 2048  # rows compared per block: memory O(block × N), never N × N
DEDUP_MIN = 0.9  # below this, "duplicates" are merely similar images and the pairs grow towards N²


@dataclass(frozen=True)
class Quota:
    """A share of K for one value of one column: ``View=PA:0.7``."""

    column: str
    value: str
    share: float

    def __str__(self) -> str:
        return f"{self.column}={self.value}:{self.share:g}"


@dataclass(frozen=True)
class Constraints:
    """What the framework applies around the selector; the defaults are xsel's long-standing patient rule."""

    one_per: str = "patient"
    dedup: float | None = None  # cosine threshold, e.g. 0.995; None: off
    balance: tuple[str, ...] = ()
    quotas: tuple[Quota, ...] = ()

    def __post_init__(self):
        if self.one_per not in ONE_PER:
            raise InputError(f"--one-per {self.one_per}: choose one of {', '.join(ONE_PER)}")
        if self.dedup is not None and not DEDUP_MIN <= self.dedup <= 1.0:
            raise InputError(
                f"--dedup {self.dedup}: give a cosine similarity between {DEDUP_MIN} and 1, e.g. 0.995 (lower values "
                "merge images that merely look alike)"
            )
        columns = {quota.column for quota in self.quotas}
        if len(columns) > 1:
            raise InputError(f"--quota: quotas on one column at a time (got {', '.join(sorted(columns))})")
        if columns & set(self.balance):
            raise InputError(f"--quota and --balance both set {columns.pop()}: use one of them for a column")
        seen = [(quota.column, quota.value) for quota in self.quotas]
        if len(set(seen)) < len(seen):
            raise InputError("--quota names the same value twice")
        if sum(quota.share for quota in self.quotas) > 1.0 + 1e-9:
            raise InputError(f"--quota shares add up to more than 1 ({', '.join(map(str, self.quotas))})")

    def to_dict(self) -> dict:
        return {
            "one_per": self.one_per,
            "dedup": self.dedup,
            "balance": list(self.balance),
            "quotas": [str(quota) for quota in self.quotas],
        }

    @classmethod
    def from_dict(cls, record: dict) -> Constraints:
        return cls(
            one_per=record.get("one_per", "patient"),
            dedup=record.get("dedup"),
            balance=tuple(record.get("balance", ())),
            quotas=parse_quotas(",".join(record.get("quotas", ()))),
        )


def parse_quotas(text: str | None) -> tuple[Quota, ...]:
    """``"View=PA:0.7,View=AP:0.2"`` → quotas; a malformed item is an input error showing the expected form."""
    quotas = []
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        match = re.fullmatch(r"([^=]+)=([^:]*):((?:\d+(?:\.\d*)?|\.\d+)%?)", item)
        if not match:
            raise InputError(f"--quota {item!r}: write COLUMN=VALUE:SHARE, e.g. View=PA:0.7 or View=PA:70%")
        share_text = match.group(3)
        share = float(share_text[:-1]) / 100 if share_text.endswith("%") else float(share_text)
        if not 0.0 <= share <= 1.0:
            raise InputError(f"--quota {item!r}: the share must lie between 0 and 1")
        quotas.append(Quota(match.group(1).strip(), match.group(2).strip(), share))
    return tuple(quotas)


def stratum_values(meta: pd.DataFrame, column: str) -> pd.Series:
    """A column's values as text for strata (blank → ``(blank)``); ``AgeBand`` is derived from ``Age``."""
    if column == AGE_BAND and AGE_BAND not in meta.columns:
        if "Age" not in meta.columns:
            raise InputError("AgeBand needs an Age column (years) in the store; embed a CSV (or scan) with ages")
        ages = pd.to_numeric(meta["Age"], errors="coerce")
        bands = pd.Series(UNKNOWN, index=meta.index, dtype=object)
        for low, high, name in AGE_BANDS:
            bands[(ages >= low) & (ages < high)] = name
        return bands
    if column not in meta.columns:
        raise InputError(
            f"no column {column!r} in the store to balance or set quotas on; columns: {list(meta.columns)}"
        )
    values = meta[column]
    text = values.astype(object).where(values.notna(), UNKNOWN).astype(str).str.strip()
    return text.where(text != "", UNKNOWN)


# ---------------------------------------------------------------------------------------------------- pool rules


def one_per_unit(meta: pd.DataFrame, rows: np.ndarray, one_per: str) -> np.ndarray:
    """Keep the first of ``rows`` for each patient (or study); rows with a blank ID stay. ``image``: all."""
    column = UNIT_COLUMNS.get(one_per)
    if column is None:
        return rows
    if column not in meta.columns:
        if one_per == "study":
            raise InputError("--one-per study needs a StudyInstanceUID column (xsel scan writes it from DICOM tags)")
        return rows
    units = pd.Series(meta[column].to_numpy(dtype=object)[rows])
    text = units.astype(str)  # IDs compare as text, as written to the labelling CSVs
    named = units.notna().to_numpy() & (text.str.strip() != "").to_numpy()
    repeated = np.zeros(len(rows), dtype=bool)  # blank IDs never repeat: each stays
    repeated[named] = text[named].duplicated().to_numpy()
    return np.asarray(rows, dtype=np.int64)[~repeated]


def present(value) -> bool:
    """Whether an ID cell holds a value (not None, NaN or blank text): blank IDs never group images."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):  # None, NaN, pd.NA
        return False
    return str(value).strip() != ""


def duplicate_groups(embeddings: np.ndarray, threshold: float) -> list[np.ndarray]:
    """Groups (≥ 2 rows, ascending, ordered by first row) of images linked by cosine similarity ≥ ``threshold``:
    the connected components of that graph.

    Compared block by block: memory O(``DEDUP_BLOCK`` × N) plus the pairs found, time O(N² · D) — about a minute for
    100,000 × 512 on two cores; meant for pools, not whole archives at once."""
    points = unit_rows(embeddings)
    n = len(points)
    rows, columns = [], []
    for start in range(0, n, DEDUP_BLOCK):
        block_rows, block_columns = np.nonzero(
            points[start : start + DEDUP_BLOCK] @ points[start:].T >= threshold - 1e-6
        )
        later = block_columns > block_rows  # each pair once, never a row with itself
        rows.append(block_rows[later] + start)
        columns.append(block_columns[later] + start)
    rows, columns = np.concatenate(rows or [np.zeros(0, int)]), np.concatenate(columns or [np.zeros(0, int)])
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, columns)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    order = np.argsort(labels, kind="stable")
    groups = np.split(order, np.cumsum(np.bincount(labels))[:-1])
    return sorted((group for group in groups if len(group) > 1), key=lambda group: group[0])


# ---------------------------------------------------------------------------------------------------- strata


@dataclass
class StratumPlan:
    """How K is split: each stratum's key, its pool rows (positions in the pool), target and wanted share; quota
    values with no image in the pool (``absent``) and notes for the user."""

    keys: list[tuple[str, ...]]
    rows: list[np.ndarray]
    targets: list[int]
    wanted: list[float]
    absent: list[tuple[str, float]] = field(default_factory=list)  # (quota, its wanted share of K)
    notes: list[str] = field(default_factory=list)

    def shortfalls(self) -> list[str]:
        """Strata (and quota values) that could not get their share, in words; none when K exceeds the pool."""
        if sum(self.targets) < round(sum(self.wanted)):  # K above the pool: every image is picked
            return []
        short = [
            f"{'/'.join(key)}: {len(rows)} images for a share of {want:.1f}"
            for key, rows, want in zip(self.keys, self.rows, self.wanted, strict=True)
            if len(rows) < round(want)
        ]
        return short + [f"{quota}: no image in the pool for a share of {want:.1f}" for quota, want in self.absent]


def plan_strata(meta: pd.DataFrame, k: int, constraints: Constraints) -> StratumPlan | None:
    """Split the pool (``meta``, one row per pool image) into strata and K into their targets; None when no
    balance or quota is asked for. Targets follow the wanted shares by largest remainder (ties: the larger stratum,
    blank values last), capped by each stratum's size; what a small stratum cannot take goes to the others in
    proportion to their shares. Quota values match the pool's values regardless of case."""
    columns = [*(quota.column for quota in constraints.quotas[:1]), *constraints.balance]
    if not columns:
        return None
    values = pd.DataFrame({column: stratum_values(meta, column).to_numpy() for column in columns})
    keys = sorted(set(map(tuple, values.to_numpy().tolist())), key=lambda key: (UNKNOWN in key, key))
    index = {key: i for i, key in enumerate(keys)}
    membership = np.asarray([index[tuple(row)] for row in values.to_numpy().tolist()], dtype=np.int64)
    rows = [np.flatnonzero(membership == i) for i in range(len(keys))]
    wanted, absent = _wanted_shares(keys, constraints, k)
    notes = [
        f"--balance {column}: {int((values[column] == UNKNOWN).sum())} images have no {column}; they form their own "
        "stratum"
        for column in constraints.balance
        if (values[column] == UNKNOWN).any()
    ]
    return StratumPlan(keys, rows, _allocate(wanted, [len(r) for r in rows], k), wanted, absent, notes)


def _wanted_shares(keys: list[tuple[str, ...]], constraints: Constraints, k: int) -> tuple[list[float], list]:
    """K × each stratum's share — quota values get their share, the column's other values split the rest equally,
    and balance columns split each of those equally among their combinations — and the quotas whose value is not
    in the pool, with their share of K."""
    if not constraints.quotas:
        return [k / len(keys)] * len(keys), []
    spelled = {key[0].casefold(): key[0] for key in keys}
    quotas = {spelled.get(quota.value.casefold(), quota.value): quota for quota in constraints.quotas}
    absent = [(str(quota), k * quota.share) for value, quota in quotas.items() if value not in spelled.values()]
    others = {key[0] for key in keys} - set(quotas)
    rest = max(0.0, 1.0 - sum(quota.share for quota in quotas.values()))
    share = {value: quota.share for value, quota in quotas.items()} | {value: rest / len(others) for value in others}
    combos: dict[str, int] = {}
    for key in keys:
        combos[key[0]] = combos.get(key[0], 0) + 1
    return [k * share[key[0]] / combos[key[0]] for key in keys], absent


def _allocate(wanted: list[float], sizes: list[int], k: int) -> list[int]:
    """Integer targets near ``wanted`` (largest remainder), each ≤ its stratum's size, summing to min(K, pool)."""
    wanted = np.asarray(wanted, dtype=np.float64)
    sizes = np.asarray(sizes, dtype=np.int64)
    total = int(min(k, sizes.sum()))
    targets = np.zeros(len(sizes), dtype=np.int64)
    open_ = sizes > 0
    while targets.sum() < total and open_.any():
        remaining = total - targets.sum()
        weights = np.where(open_, wanted, 0.0)
        if weights.sum() <= 0:  # only strata with no share are left (a quota of 0 or K fully given)
            weights = np.where(open_, 1.0, 0.0)
        share = weights / weights.sum() * remaining
        step = np.floor(share).astype(np.int64)
        order = np.lexsort((np.arange(len(sizes)), -sizes, -(share - step)))  # remainder, then size, then key
        for i in order[: int(remaining - step.sum())]:
            if open_[i]:
                step[i] += 1
        step = np.minimum(step, sizes - targets)
        if step.sum() == 0:
            step[np.flatnonzero(open_)[0]] = 1
        targets += step
        open_ = targets < sizes
    return targets.tolist()


def stratum_seed(seed: int, key: tuple[str, ...]) -> int:
    """A stratum's own seed, a function of the run's seed and the stratum's values (reproducible, verifiable)."""
    return int(np.random.SeedSequence([seed, zlib.crc32("/".join(key).encode())]).generate_state(1)[0])


def interleave(ranked: list[np.ndarray], targets: list[int]) -> np.ndarray:
    """One priority order from each stratum's ranked picks: the i-th pick of a stratum of target t comes at
    fraction (i + 0.5) / t of the list, so every prefix of the selection is as balanced as it can be."""
    entries = [
        ((i + 0.5) / max(target, 1), s, pick)
        for s, (picks, target) in enumerate(zip(ranked, targets, strict=True))
        for i, pick in enumerate(picks)
    ]
    return np.asarray([pick for _, _, pick in sorted(entries)], dtype=np.int64)
