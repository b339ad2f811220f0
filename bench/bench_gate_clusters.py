"""The trust gate with each reference split into k-means clusters against whole references, over training seeds.

For each ``--store`` (the realcxr pack embedded by one encoder, as ``bench_realcxr_setselect.py --cache`` keeps it)
and each training configuration — NIH alone, NIH and Kermany (``--episodes-within Source``, a reference per source)
— a set selector is trained for two steps per seed: the gate does not depend on the policy (its references,
held-out pools and threshold come from the store, the patients' split and the seed). Its gate is calibrated with
each reference split into ``xsel.trust.CLUSTERS`` k-means clusters and with whole references (the gate before
clusters), both by :func:`xsel.train.selector.recalibrate_gate`; training ships the first with a reference per
hospital, the second with one hospital ("shipped" in the table). Both judge the held-out
test pools of NIH's unseen conditions, Kermany, the COVID sources and the archive protocol on NIH and on all sources
(``--episodes`` pools per condition, drawn as ``xsel evaluate`` draws them). Per seed: the threshold and on how many
pools each gate fires. A gate should stay quiet on the hospitals it trained on and fire on the others, every seed.

    cd bench && python bench_gate_clusters.py --cache /work/benchdata --store efficientnet-lite0 --store moco-resnet18
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
from bench_realcxr_medselect import test_patients, training_config
from bench_realcxr_setselect import ARCHIVES, GROUPS, training_hospitals

from xsel.episodes import ArchiveTask, EpisodeTask
from xsel.store import read_store
from xsel.train.checkpoints import gate_from_payload
from xsel.train.medselect import load_selector_checkpoint
from xsel.train.selector import recalibrate_gate, train_selector
from xsel.trust import CLUSTERS

CONFIGURATIONS = {"NIH": [], "NIH + Kermany": ["Kermany"]}


def test_pools(store, episodes: int) -> dict[str, list[tuple[np.ndarray, int]]]:
    """Per test group, its held-out pools' embeddings and seeds, as ``evaluate`` draws them (K=20, pool 100,
    query 40, seed 0)."""
    test_patient, source = test_patients(store), store.meta["Source"]
    sizes = {"pool_size": 100, "query_size": 40, "k": 20}
    pools = {}
    for group, (sources, conditions, negative) in GROUPS.items():
        test = store.subset(np.flatnonzero(source.isin(sources).to_numpy() & test_patient))
        tasks = [EpisodeTask(test, condition, negative=negative, **sizes) for condition in conditions]
        drawn = [task.episode(index, 0) for task in tasks for index in range(episodes)]
        pools[group] = [(test.embeddings[e.pool], e.seed) for e in drawn]
    for group, sources in ARCHIVES.items():
        test = store.subset(np.flatnonzero(source.isin(sources).to_numpy() & test_patient))
        task = ArchiveTask(test, None, **sizes)
        pools[group] = [(test.embeddings[e.pool], e.seed) for e in (task.episode(i, 0) for i in range(episodes))]
    return pools


def gates(store, with_hospital: list[str], seed: int, folder: Path) -> tuple[dict, str]:
    """The gates of a two-step set selector trained with ``seed``, calibrated with each reference in ``CLUSTERS``
    k-means clusters and whole, and the name of the one training gave it (None: neither, bit for bit)."""
    train_store, hospitals = training_hospitals(store, test_patients(store), with_hospital)
    sizes = argparse.Namespace(k=20, pool_size=100, query_size=40, minutes=10.0)
    config = training_config(sizes, episodes=32, model="set", seed=seed, **hospitals)
    train_selector(train_store, folder / "run", config, show_progress=False)
    made = {}
    for name, clusters in ((f"{CLUSTERS} clusters", CLUSTERS), ("whole", 1)):
        path = recalibrate_gate(folder / "run" / "selector.pt", train_store, folder / name, clusters=clusters)
        made[name] = gate_from_payload(load_selector_checkpoint(path)[0])
    shipped = gate_from_payload(load_selector_checkpoint(folder / "run" / "selector.pt")[0]).to_record()
    return made, next((name for name, gate in made.items() if gate.to_record() == shipped), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, required=True, help="folder of the realcxr-NAME.h5 stores")
    parser.add_argument("--store", action="append", required=True, help="NAME of realcxr-NAME.h5 (repeatable)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--configuration", choices=list(CONFIGURATIONS), action="append")
    parser.add_argument("--episodes", type=int, default=120, help="test pools per condition")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = json.loads(args.json.read_text()) if args.json and args.json.exists() else []
    for name in args.store:
        store = read_store(args.cache / f"realcxr-{name}.h5")
        pools = test_pools(store, args.episodes)
        for configuration in args.configuration or list(CONFIGURATIONS):
            for seed in args.seeds:
                with tempfile.TemporaryDirectory() as folder:
                    made, shipped = gates(store, CONFIGURATIONS[configuration], seed, Path(folder))
                for variant, gate in made.items():
                    fired = {
                        group: int(sum(gate.check(embeddings, seed=s).fired for embeddings, s in group_pools))
                        for group, group_pools in pools.items()
                    }
                    gate_name = f"{variant} (shipped)" if variant == shipped else variant
                    row = {"store": name, "trained on": configuration, "seed": seed, "gate": gate_name}
                    row |= {"threshold": gate.threshold, "fallback": gate.fallback, "fired": fired}
                    rows.append(row | {"pools": {group: len(group_pools) for group, group_pools in pools.items()}})
                    print(json.dumps(rows[-1]), flush=True)
                if args.json:
                    args.json.write_text(json.dumps(rows, indent=1))
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    """Markdown: per store, configuration and gate, the thresholds over seeds and, per test group, the pools the
    gate fired on, seed by seed."""
    groups = list(rows[0]["pools"]) if rows else []
    print("| store | trained on | gate | thresholds (seeds) | " + " | ".join(groups) + " |")
    print("|" + "---|" * (4 + len(groups)))
    keys = dict.fromkeys((r["store"], r["trained on"], r["gate"]) for r in rows)
    for store, configuration, variant in keys:
        mine = [r for r in rows if (r["store"], r["trained on"], r["gate"]) == (store, configuration, variant)]
        thresholds = ", ".join(f"{r['threshold']:.4f}" for r in mine)
        fired = [" ".join(f"{r['fired'][g] / r['pools'][g]:.0%}" for r in mine) for g in groups]
        fired = [f"{shares} of {mine[0]['pools'][g]}" for shares, g in zip(fired, groups, strict=True)]
        print(f"| {store} | {configuration} | {variant} | {thresholds} | " + " | ".join(fired) + " |")


if __name__ == "__main__":
    main()
