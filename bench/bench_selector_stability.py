"""How much the set selector's behaviour per hospital depends on the training step, with and without weight averaging.

One set selector trains on NIH as ``bench_realcxr_setselect.py`` trains it (same split, settings and seed), in
``--chunks`` equal parts of ``--minutes`` (a resumed run continues exactly as an uninterrupted one). After each part
the last validated step is kept twice: its trained weights (raw) and their moving average over ``--average-steps``
steps (what ``xsel train selector --average-steps`` validates and ships). Every kept checkpoint, and the run's
shipped ``selector.pt``, then picks on the held-out patients of NIH (unseen conditions), Kermany and the COVID
sources, gate off, on the same paired episodes as kcenter. The summary gives, per hospital, the spread of Δ AUROC vs
random over the kept steps: the smaller it is, the less a site's result depends on when training stopped.
Variants of the same run: ``--no-read-embedding`` (a policy of the pool geometry alone), ``--also-train-on`` (more
seen conditions), ``--with-sources`` (other hospitals' training patients too: does a policy trained on more
hospitals' conditions pay at home on NIH's unseen ones?), ``--episodes-within-sources`` (with those, each condition's
episodes stay within the sources that label it).

    python bench/bench_selector_stability.py --name moco-resnet18 --cache /work/benchdata [--chunks 5]

The same training with several ``--seed`` values (one run and ``--json`` each) says how much of a difference is the
seed's: ``--over-seeds A.json B.json …`` tables the shipped set selector, the LSTM and set − LSTM per seed, then their
mean over the seeds with a t-interval over the seeds (the test episodes are the same for every seed).

    python bench/bench_selector_stability.py --over-seeds /work/benchdata/stability-moco-within-lstm*.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from bench_realcxr_medselect import NIH, SEEN, test_patients, training_config
from bench_realcxr_setselect import GROUPS, add_pack_store_arguments, pack_store, rows, set_vs_lstm, train

from xsel.evaluate import evaluate
from xsel.train.checkpoints import save_torch_atomic
from xsel.train.selector import train_selector


def snapshot(run_dir: Path, chunk: int) -> dict:
    """The last validated step's raw and averaged weights as two selector checkpoints (the shipped file's entries),
    taken once, right after the part is trained; a rerun reads them back."""
    folder = run_dir / "snapshots"
    if (folder / f"{chunk}-averaged" / "selector.pt").exists():
        kept = {kind: folder / f"{chunk}-{kind}" / "selector.pt" for kind in ("raw", "averaged")}
        return kept | {"step": torch.load(kept["raw"], weights_only=True, map_location="cpu")["step"]}
    shipped = torch.load(run_dir / "selector.pt", weights_only=True, map_location="cpu")
    last = torch.load(run_dir / "last.pt", weights_only=True, map_location="cpu")
    averaged = {k.removeprefix("module."): v for k, v in last["averaged"].items() if k != "n_averaged"}
    kept = {}
    for kind, weights in (("raw", last["state_dict"]), ("averaged", averaged)):
        path = folder / f"{chunk}-{kind}" / "selector.pt"
        save_torch_atomic(shipped | {"state_dict": weights, "step": last["step"]}, path)
        kept[kind] = path
    print(f"part {chunk}: step {last['step']}", flush=True)
    return kept | {"step": last["step"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pack_store_arguments(parser)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--chunks", type=int, default=5)
    parser.add_argument("--average-steps", type=int, default=1000)
    parser.add_argument("--episodes", type=int, default=120, help="test episodes per condition")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--pool-size", type=int, default=100)
    parser.add_argument("--query-size", type=int, default=40)
    parser.add_argument("--balanced", type=float, default=0.25)
    parser.add_argument(
        "--seed", type=int, default=0, help="the training runs' seed (episodes, sampling, init; the LSTM's too)"
    )
    parser.add_argument(
        "--no-read-embedding", action="store_true", help="a policy of the pool-relative features alone (geometry)"
    )
    parser.add_argument(
        "--also-train-on", default="", help="conditions to train on beside the seen five NIH ones (comma-separated)"
    )
    parser.add_argument(
        "--with-sources",
        default="",
        help="other sources whose training patients join NIH's (comma-separated, e.g. kermany,ieee8023); name their "
        "conditions in --also-train-on; their hospitals' test groups are then seen, not away",
    )
    parser.add_argument(
        "--episodes-within-sources",
        action="store_true",
        help="keep each condition's training episodes within the sources that label it (--episodes-within Source)",
    )
    parser.add_argument(
        "--lstm", type=Path, help="a MedSelect LSTM checkpoint: also the paired shipped set selector − LSTM difference"
    )
    parser.add_argument(
        "--train-lstm",
        action="store_true",
        help="train the LSTM on the same patients and conditions (--minutes, its own defaults) and compare with it",
    )
    parser.add_argument("--runs", type=Path, default=Path(__file__).parent / "results" / "stability")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--over-seeds", type=Path, nargs="+", metavar="JSON", help="summarise runs that differ only in --seed"
    )
    args = parser.parse_args()
    if args.over_seeds:
        print_over_seeds([json.loads(path.read_text()) for path in args.over_seeds])
        return
    if args.average_steps < 1 or args.chunks < 2:
        parser.error("--average-steps must be at least 1 (weights averaged) and --chunks at least 2 (a spread)")
    name = args.name or args.encoder
    store = pack_store(args)
    test_patient = test_patients(store)
    source = store.meta["Source"]
    run_dir = args.runs / name / f"set-average{args.average_steps}-seed{args.seed}"
    if args.no_read_embedding:
        run_dir = run_dir.with_name(run_dir.name + "-geometry")
    extra = [name for name in args.also_train_on.split(",") if name]
    if extra:
        run_dir = run_dir.with_name(run_dir.name + "-plus-" + "-".join(extra))
    sources = [name for name in args.with_sources.split(",") if name]
    if sources:
        run_dir = run_dir.with_name(run_dir.name + "-with-" + "-".join(sources))
    within = "Source" if args.episodes_within_sources else ""
    if within:
        run_dir = run_dir.with_name(run_dir.name + "-within")
    config = training_config(
        args,
        episodes=1_000_000,
        model="set",
        balanced=args.balanced,
        average_steps=args.average_steps,
        max_minutes=args.minutes / args.chunks,
        seed=args.seed,
        read_embedding=not args.no_read_embedding,
        conditions=[*SEEN, *extra],
        episodes_within=within,
    )
    train_store = store.subset(source.isin([*NIH, *sources]).to_numpy() & ~test_patient)
    kept = []
    for chunk in range(1, args.chunks + 1):
        if not (run_dir / "snapshots" / f"{chunk}-averaged").exists():
            resume = (run_dir / "last.pt").exists()
            train_selector(train_store, run_dir, None if resume else config, resume=resume, show_progress=False)
        kept.append(snapshot(run_dir, chunk))
    if args.train_lstm:
        lstm_dir = run_dir.with_name(run_dir.name + "-lstm")
        trained = train(
            train_store, lstm_dir, "lstm", args, conditions=config.conditions, episodes_within=within, seed=args.seed
        )
        args.lstm = Path(trained["checkpoint"])
    common = {"k": [args.k], "episodes": args.episodes, "pool_size": args.pool_size, "query_size": args.query_size}
    report = []
    for group, (sources, conditions, negative) in GROUPS.items():
        test = store.subset(source.isin(sources).to_numpy() & test_patient)
        options = {"negative": negative, "trust_gate": False, "show_progress": False, **common}
        report += rows(evaluate(test, conditions, selectors=["kcenter"], **options), group, "heuristic")
        checkpoints = [("shipped", run_dir / "selector.pt")]
        checkpoints += [(f"{kind} step {k['step']}", k[kind]) for k in kept for kind in ("raw", "averaged")]
        for variant, checkpoint in checkpoints:
            result = evaluate(test, conditions, selectors=[f"setselect={checkpoint}"], **options)
            report += [r for r in rows(result, group, variant) if r["selector"] != "random"]
        if args.lstm:
            selectors = [f"setselect={run_dir / 'selector.pt'}", f"medselect={args.lstm}"]
            result = evaluate(test, conditions, selectors=selectors, **options)
            report += [r for r in rows(result, group, "LSTM") if r["selector"] == "medselect"]
            report += [r for r in rows(set_vs_lstm(result), group, "shipped − LSTM") if r["selector"] != "random"]
        print(f"{group}: done", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args), "rows": report}, indent=2, default=str))
    print_tables(report, list(GROUPS))


def print_tables(report: list[dict], groups: list[str]) -> None:
    """Each kept step's Δ AUROC vs random per hospital, then the spread over the kept steps, raw vs averaged."""
    cell = {(r["variant"], r["group"]): r for r in report if r["selector"] != "random"}
    variants = list(dict.fromkeys(r["variant"] for r in report if r["selector"] != "random"))
    print("\n| set selector | " + " | ".join(groups) + " |\n|---|" + "---|" * len(groups))
    for variant in variants:
        label = "kcenter" if variant == "heuristic" else variant
        shown = []
        for group in groups:
            r = cell[(variant, group)]
            shown.append(f"{r['diff']:+.3f} [{r['diff_ci'][0]:+.3f}, {r['diff_ci'][1]:+.3f}]")
        print(f"| {label} | " + " | ".join(shown) + " |")
    print("\n| over the kept steps | " + " | ".join(groups) + " |\n|---|" + "---|" * len(groups))
    for kind in ("raw", "averaged"):
        shown = []
        for group in groups:
            values = np.array([cell[(v, group)]["diff"] for v in variants if v.startswith(kind)])
            shown.append(f"mean {values.mean():+.3f}, SD {values.std(ddof=1):.3f}, range {np.ptp(values):.3f}")
        print(f"| {kind} | " + " | ".join(shown) + " |")


SEED_ROWS = {"set selector": "shipped", "LSTM": "LSTM", "set − LSTM": "shipped − LSTM"}
PER_RUN_SETTINGS = {"seed", "json", "lstm", "over_seeds"}


def print_over_seeds(runs: list[dict]) -> None:
    """Per hospital: each seed's Δ AUROC (CI over its episodes), then their mean with a t-interval over the seeds."""
    from scipy import stats

    first = {k: v for k, v in runs[0]["settings"].items() if k not in PER_RUN_SETTINGS}
    for run in runs[1:]:
        other = {k: v for k, v in run["settings"].items() if k not in PER_RUN_SETTINGS}
        if other != first:
            differ = sorted(k for k in first.keys() | other.keys() if first.get(k) != other.get(k))
            raise SystemExit(f"--over-seeds: the runs differ in {', '.join(differ)}, not only in --seed")
    seeds = [run["settings"]["seed"] for run in runs]
    if len(set(seeds)) < len(seeds) or len(seeds) < 2:
        raise SystemExit(f"--over-seeds needs runs of two or more different seeds, got seeds {seeds}")
    cells = [{(r["variant"], r["group"]): r for r in run["rows"]} for run in runs]
    groups = list(dict.fromkeys(r["group"] for r in runs[0]["rows"]))
    print(f"\n| {first['name']}, seeds {', '.join(map(str, seeds))} | " + " | ".join(groups) + " |")
    print("|---|" + "---|" * len(groups))
    for label, variant in SEED_ROWS.items():
        for seed, cell in zip(seeds, cells, strict=True):
            shown = [
                f"{cell[variant, g]['diff']:+.3f} [{cell[variant, g]['diff_ci'][0]:+.3f}, "
                f"{cell[variant, g]['diff_ci'][1]:+.3f}]"
                for g in groups
            ]
            print(f"| {label}, seed {seed} | " + " | ".join(shown) + " |")
        shown = []
        for group in groups:
            values = np.array([cell[variant, group]["diff"] for cell in cells])
            half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
            shown.append(
                f"**{values.mean():+.3f}** [{values.mean() - half:+.3f}, {values.mean() + half:+.3f}], "
                f"SD {values.std(ddof=1):.3f}"
            )
        print(f"| **{label}, mean over seeds** | " + " | ".join(shown) + " |")


if __name__ == "__main__":
    main()
