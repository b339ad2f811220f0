"""Can a site tell, without labels, whether a learned selector will pay on its images?

Site adaptation (``xsel train selector --adapt``) trains on pseudo-tasks, and a label-free trust gate would
have to referee with them: k-means clusters of the site's embeddings as pseudo-conditions, or the attributes every
DICOM header carries (sex, age over 60, AP vs PA view). Here each candidate referee ranks random, the heuristics and
the learned selectors on the held-out test patients of each group of ``bench_realcxr_setselect.py`` (home: NIH
unseen conditions; away: Kermany, the COVID sources), beside the ranking by the real conditions on the same images.
A referee a site could use must pick, per group, the selector the real conditions pick. Kermany's images carry no
sex or age and are all AP views, so Kermany has no header referee.

    python bench/bench_label_free_referee.py --store STORE.h5 --selector moco=RUN/selector.pt [--selector …]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
from bench_realcxr_medselect import test_patients
from bench_realcxr_setselect import GROUPS, HEURISTICS

from xsel.errors import InputError
from xsel.evaluate import evaluate
from xsel.labels import available_conditions
from xsel.store import Store, read_store
from xsel.train.selector import PSEUDO_NEGATIVE, pseudo_labelled

HEADER_TASKS = (("female", "male"), ("over 60", "60 or under"), ("AP view", "PA view"))  # positive, negative


def header_labelled(store: Store) -> Store:
    """The store with its condition labels replaced by header attributes: sex and age where both are known,
    the view where it is AP or PA."""
    meta = store.meta.drop(columns=available_conditions(store.meta))
    sex = store.meta["Sex"].astype(str).str.upper().str[:1]
    age = pd.to_numeric(store.meta["Age"], errors="coerce")
    view = store.meta["View"].astype(str).str.upper()
    known = (sex.isin(["M", "F"]) & age.notna()).to_numpy()
    for name, values in (
        ("female", sex == "F"),
        ("male", sex == "M"),
        ("over 60", age > 60),
        ("60 or under", age <= 60),
    ):
        meta[name] = np.where(known, values.astype(float), np.nan)
    meta["AP view"], meta["PA view"] = view.str.contains("AP").astype(float), view.str.contains("PA").astype(float)
    return Store(path=store.path, embeddings=store.embeddings, paths=store.paths, meta=meta, attrs=store.attrs)


def mean_auroc(store: Store, tasks: list[tuple[str, str]], selectors: list[str], args) -> dict[str, float] | None:
    """Each selector's mean query AUROC over the tasks (condition, negative) that have images enough for episodes;
    None where none has."""
    means = []
    for condition, negative in tasks:
        try:
            result = evaluate(
                store,
                [condition],
                selectors=selectors,
                k=[args.k],
                episodes=args.episodes,
                pool_size=args.pool_size,
                query_size=args.query_size,
                negative=negative,
                trust_gate=False,
                show_progress=False,
            )
        except InputError:  # a pseudo-condition too small among this group's patients
            continue
        means.append(result.summary[result.summary["condition"] == "all"].set_index("selector")["auroc"])
    if not means:
        return None
    return {name: float(value) for name, value in pd.concat(means, axis=1).mean(axis=1).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, required=True, help="the realcxr pack's store (all sources)")
    parser.add_argument("--selector", action="append", required=True, help="NAME=CKPT of a set selector")
    parser.add_argument("--clusters", type=int, default=8)
    parser.add_argument("--episodes", type=int, default=60, help="episodes per task")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--pool-size", type=int, default=100)
    parser.add_argument("--query-size", type=int, default=40)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    store = read_store(args.store)
    learned = dict(spec.split("=", 1) for spec in args.selector)
    test, source = test_patients(store), store.meta["Source"]
    report = []
    for group, (sources, conditions, negative) in GROUPS.items():
        images = store.subset(source.isin(sources).to_numpy() & test)
        pseudo = pseudo_labelled(images, args.clusters, seed=0)
        clusters = [c for c in pseudo.meta.columns if c.startswith("cluster ")]
        referees = {
            "real conditions": (images, [(c, negative) for c in conditions]),
            "k-means clusters": (pseudo, [(c, PSEUDO_NEGATIVE) for c in clusters]),
            "header attributes": (header_labelled(images), list(HEADER_TASKS)),
        }
        for name, checkpoint in learned.items():  # one learned selector at a time: evaluate names them all setselect
            for referee, (labelled, tasks) in referees.items():
                auroc = mean_auroc(labelled, tasks, [*HEURISTICS, f"setselect={checkpoint}"], args)
                if auroc is None:
                    print(f"{group}: no {referee} with images enough for episodes", flush=True)
                    continue
                auroc[name] = auroc.pop("setselect")
                report.append({"group": group, "referee": referee, "learned": name, "auroc": auroc})
                print(f"{group}, {name}, {referee}: " + ", ".join(f"{s} {a:.3f}" for s, a in auroc.items()), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args), "rows": report}, indent=2, default=str))
    print_table(report, learned)


def print_table(report: list[dict], learned: dict[str, str]) -> None:
    """Per group and learned selector: Δ mean AUROC vs random of the learned selector and each heuristic under
    each referee, and whether the referee's first choice is the real conditions' first choice."""
    print("\n| group | learned | referee | " + " | ".join([*HEURISTICS[1:], "learned"]) + " | first choice |")
    print("|---|---|---|" + "---|" * len(HEURISTICS) + "---|")
    for row in report:
        auroc = row["auroc"]
        truth = next(
            r["auroc"]
            for r in report
            if (r["group"], r["learned"], r["referee"]) == (row["group"], row["learned"], "real conditions")
        )
        first, true_first = max(auroc, key=auroc.get), max(truth, key=truth.get)
        cells = [f"{auroc[s] - auroc['random']:+.3f}" for s in [*HEURISTICS[1:], row["learned"]]]
        verdict = first
        if row["referee"] != "real conditions":
            verdict += " (right)" if first == true_first else " (wrong)"
        print(f"| {row['group']} | {row['learned']} | {row['referee']} | " + " | ".join(cells) + f" | {verdict} |")


if __name__ == "__main__":
    main()
