"""Can a label-blind pick balance the classes at a hospital where the finding is the majority? (issue 16)

On the COVID sources 83% of the images are COVID-19; a pick that knows the labels and takes K/2 of each class gains
about +0.06 AUROC there, and no built-in heuristic gains. This tries two label-blind families, registered as a
throwaway selector plugin (`xsel.plugins.register_plugin`), on held-out patients of each hospital (the tests of
`bench_realcxr_setselect.py`: NIH unseen conditions, Kermany, the COVID sources), paired with random, built-in
heuristics and oracle-balanced on the same episodes:

- ``balanceC-random`` / ``balanceC-medoids``: k-means of the pool (cosine) into C groups, K split over them as
  ``xsel select --balance`` splits it over a column's values, at random or as k-medoids within each group — class
  balance, if the classes are the pool's main clusters;
- ``NAME@TRANSFORM``: each heuristic in a pool-relative geometry — ``centred`` (the pool's mean subtracted, then
  unit rows), ``whitenD`` (the pool's first D principal components, each scaled to unit variance) and
  ``whitenD-unit`` (the same, then unit rows).

Prints Markdown tables: random's AUROC and each selector's paired Δ vs random [95% CI] per hospital.

    python bench/bench_away_balance.py [--cache DIR] [--encoder efficientnet-lite0] [--episodes 120] [--json F]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
from bench_realcxr_medselect import test_patients
from bench_realcxr_setselect import GROUPS, HEURISTICS, add_pack_store_arguments, held_out, pack_store, rows
from benchlib import has_realcxr
from sklearn.cluster import KMeans
from xsel_plugins.selectors import GEOMETRY_SELECTORS, KMedoidsSelector

from xsel import hookimpl, plugins
from xsel.constraints import Constraints, plan_strata
from xsel.evaluate import evaluate
from xsel.geometry import geometry_rows, unit_rows

GROUP_COUNTS = (2, 3, 4)
TRANSFORMS = ("centred", "whiten8", "whiten32", "whiten32-unit")


class BalancedClusters:
    """K split over the pool's C k-means groups (cosine) as `--balance` splits it; random or k-medoids within each."""

    uses_labels = False

    def __init__(self, groups: int, within: str):
        self.groups, self.within = groups, within

    def select(self, embeddings, k, *, seed, metadata=None):
        groups = KMeans(self.groups, n_init=4, random_state=seed).fit_predict(geometry_rows(embeddings, "cosine"))
        # the groups' shares of K as `xsel select --balance` splits K over a column's values
        plan = plan_strata(pd.DataFrame({"group": groups.astype(str)}), k, Constraints(balance=("group",)))
        rng = np.random.default_rng(seed)
        picks = []
        for members, share in zip(plan.rows, plan.targets, strict=True):
            if self.within == "random" or share >= len(members):
                picks += list(rng.permutation(members)[:share])
            elif share:
                picks += list(members[KMedoidsSelector().select(embeddings[members], share, seed=seed)])
        return np.asarray(picks, dtype=np.int64)


def transformed(embeddings: np.ndarray, transform: str) -> np.ndarray:
    """The pool's rows in a pool-relative geometry (see the module docstring)."""
    centred = np.asarray(embeddings, dtype=np.float64) - np.mean(embeddings, axis=0)
    if transform == "centred":
        return unit_rows(centred)
    dims = int(transform.removeprefix("whiten").removesuffix("-unit"))
    left, _, _ = np.linalg.svd(centred, full_matrices=False)
    whitened = (left[:, :dims] * np.sqrt(len(centred))).astype(np.float32)
    return unit_rows(whitened) if transform.endswith("-unit") else whitened


class PoolRelative:
    """A built-in heuristic, Euclidean, on the pool's rows in a pool-relative geometry."""

    uses_labels = False

    def __init__(self, heuristic: str, transform: str):
        self.heuristic, self.transform = GEOMETRY_SELECTORS[heuristic]("euclidean"), transform

    def select(self, embeddings, k, *, seed, metadata=None):
        return self.heuristic.select(transformed(embeddings, self.transform), k, seed=seed)


EXPERIMENTS = {  # name: factory of each selector tried here
    **{
        f"balance{groups}-{within}": (lambda g=groups, w=within: BalancedClusters(g, w))
        for groups in GROUP_COUNTS
        for within in ("random", "medoids")
    },
    **{
        f"{heuristic}@{transform}": (lambda h=heuristic, t=transform: PoolRelative(h, t))
        for transform in TRANSFORMS
        for heuristic in GEOMETRY_SELECTORS
    },
}


class BalanceExperiments:
    """The selectors tried here, as a plugin registered in this process only."""

    @staticmethod
    @hookimpl
    def register_selectors(register):
        for name, factory in EXPERIMENTS.items():
            register(name, factory, description=f"bench_away_balance.py: {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pack_store_arguments(parser)
    parser.add_argument("--episodes", type=int, default=120, help="test episodes per condition")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not has_realcxr():
        raise SystemExit("the realcxr pack is not here (../shared/data/realcxr); nothing to measure")
    args.permute_test_rows = None
    store = pack_store(args)
    test_patient, source = test_patients(store), store.meta["Source"]
    plugins.register_plugin(BalanceExperiments, name="balance-experiments")
    selectors = [*HEURISTICS, "oracle-balanced", *EXPERIMENTS]
    common = {"k": [20], "episodes": args.episodes, "pool_size": 100, "query_size": 40}
    report, began = [], time.perf_counter()
    for group, (sources, conditions, negative) in GROUPS.items():
        test = held_out(store, source.isin(sources).to_numpy() & test_patient, args)
        result = evaluate(
            test, conditions, selectors=selectors, negative=negative, trust_gate=False, show_progress=False, **common
        )
        report += rows(result, group, "raw")
        print(f"{group}: done ({(time.perf_counter() - began) / 60:.1f} min)", flush=True)
    groups = list(GROUPS)
    print("\n| selector | " + " | ".join(groups) + " |\n|---|" + "---|" * len(groups))
    for selector in dict.fromkeys(r["selector"] for r in report):
        cells = []
        for group in groups:
            (r,) = [r for r in report if (r["selector"], r["group"]) == (selector, group)]
            low, high = r["diff_ci"]
            cells.append(f"{r['auroc']:.3f}" if selector == "random" else f"{r['diff']:+.3f} [{low:+.3f}, {high:+.3f}]")
        print(f"| {selector} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args), "rows": report}, indent=2, default=str))


if __name__ == "__main__":
    main()
