"""The set selector against MedSelect's LSTM and the heuristics, at home and away, with the trust gate.

Patients are split once (seeded): 60% train the selectors (their own validation split inside), 40% are held out
for testing, so no test image was ever in a training pool. Both selectors train on NIH only (seen NIH conditions
vs NIH "No Finding"), each for the same CPU budget. Tests, all on held-out patients, paired over episodes:

- NIH, unseen conditions (home); Kermany children's pneumonias and the COVID sources (away, never trained on);
- the archive protocol (a random draw of the store, K picks labelled for every condition) on NIH and on all sources;
- learned selectors with the trust gate (as shipped) and without it (the raw policy); with ``--adapt``, the set
  selector adapted without labels to each away store (``xsel train selector --adapt``);
- with ``--distil``, the set selector is distilled from the LSTM run (``xsel train selector --teacher``);
- with ``--last-step``, the set selector's last trained weights against the shipped ones (its best-validated
  step, or its average when the run averages weights), raw;
  with ``--stretch``, its K=20 against all 100 pool labels on the home test (issue 16's stretch target);
- with ``--with-hospital Kermany``, both selectors also train on Kermany's training patients and its conditions
  (episodes within each source), so Kermany is seen and the COVID sources alone are away;
- with ``--leave-one-out``, for each away hospital a set selector trained on every other source's training patients
  and tested on that hospital, raw and gated.

Prints Markdown tables (Δ AUROC vs random with paired 95% CIs) and writes ``--json``.

    python bench/bench_realcxr_setselect.py [--encoder efficientnet-lite0] [--minutes 10] [--episodes 120]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from bench_realcxr_medselect import NIH, SEEN, UNSEEN_KERMANY, UNSEEN_NIH, test_patients, training_config
from benchlib import REALCXR

from xsel.embed import embed
from xsel.episodes import NEGATIVE_DEFAULT
from xsel.evaluate import REFERENCE, evaluate, summarize
from xsel.store import read_store
from xsel.train.selector import train_selector

COVID = ("ieee8023", "actualmed", "figure1")
GROUPS = {  # name: (sources, conditions, negative class)
    "NIH unseen": (NIH, UNSEEN_NIH, "No Finding"),
    "Kermany": (("kermany",), UNSEEN_KERMANY, "No Finding"),
    "COVID sources": (COVID, ["COVID-19"], "No Finding,Bacterial Pneumonia,Viral Pneumonia"),
}
AWAY = {group: GROUPS[group] for group in ("Kermany", "COVID sources")}
ARCHIVES = {"archive NIH": NIH, "archive all": (*NIH, "kermany", *COVID)}
HEURISTICS = ["random", "kmedoids", "kcenter", "typiclust", "probcover"]


def train(store, run_dir: Path, model: str, args, **changes) -> dict:
    """Train one selector (or reuse a finished run), ``changes`` to the training settings; returns its checkpoint."""
    options = {"seed": args.seed, "balanced": 0.0}
    if model == "set":
        options |= {"balanced": args.balanced, "read_embedding": not args.no_read_embedding}
        given = {"average_steps": args.average_steps, "learning_rate": args.learning_rate, "hidden": args.hidden}
        options |= {key: value for key, value in given.items() if value is not None}
    config = training_config(args, episodes=1_000_000, model=model, **(options | changes))
    if not (run_dir / "selector.pt").exists():
        began = time.perf_counter()
        result = train_selector(store, run_dir, config, show_progress=False)
        print(
            f"{run_dir.name}: {result.steps} steps in {(time.perf_counter() - began) / 60:.1f} min, "
            f"{'average' if result.averaged else 'best'} validated {result.best_val_auroc:.3f} at step "
            f"{result.best_step} (random {result.random_val_auroc:.3f})",
            flush=True,
        )
    return {"checkpoint": str(run_dir / "selector.pt")}


def speed(store, checkpoint: str, encoder: str, folder: Path, size: int = 100_000, repeats: int = 3) -> dict:
    """Seconds to pick K=20 of ``size`` images (real embeddings tiled with small noise) with the set selector:
    PyTorch on the workstation and the exported bundle's ONNX graph at the site (median of ``repeats``)."""
    import statistics

    from xsel.bundle import Bundle
    from xsel.site import BundleSelector
    from xsel.train.export import export_bundle
    from xsel.train.medselect import SetSelector

    bundle = folder / "bundle"
    if not bundle.exists():
        export_bundle(bundle, encoder=encoder, selector=f"setselect={checkpoint}")
    reps = -(-size // len(store))
    rng = np.random.default_rng(0)
    pool = np.tile(store.embeddings, (reps, 1))[:size]
    pool = pool + rng.normal(0, 0.01, pool.shape).astype(np.float32)
    timings = {}
    for name, selector in (("torch", SetSelector(checkpoint)), ("onnx bundle", BundleSelector(Bundle.load(bundle)))):
        seconds = []
        for _ in range(repeats):
            began = time.perf_counter()
            selector.select(pool, 20, seed=0)
            seconds.append(time.perf_counter() - began)
        timings[name] = statistics.median(seconds)
    print(
        f"set selector, K=20 of {size:,} × {pool.shape[1]}: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
    )
    return timings


def set_vs_lstm(result):
    """The raw evaluation summarised with the LSTM as the reference: the paired set − LSTM difference and its CI
    (``summarize`` pairs every selector with the reference's episodes)."""
    table = result.episodes[result.episodes["selector"].isin(["medselect", "setselect"])]
    table = table.assign(selector=table["selector"].replace({"medselect": REFERENCE}))
    return replace(result, summary=summarize(table), settings={})


def rows(result, group: str, variant: str) -> list[dict]:
    overall = result.summary[result.summary["condition"] == "all"]
    fell_back = result.settings.get("fell_back", {})
    out = []
    for r in overall.itertuples():
        counts = fell_back.get(r.selector)
        share = None
        if counts:
            fired, seen = (sum(c[key] for c in counts.values()) for key in ("fell_back", "episodes"))
            share = f"{fired}/{seen}"
        out.append(
            {
                "group": group,
                "variant": variant,
                "selector": r.selector,
                "auroc": r.auroc,
                "diff": r.diff_vs_random,
                "diff_ci": [r.diff_low, r.diff_high],
                "probe_diff": getattr(r, "probe_diff_vs_random", None),
                "probe_diff_ci": [getattr(r, "probe_diff_low", None), getattr(r, "probe_diff_high", None)],
                "fell_back": share,
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pack_store_arguments(parser)
    parser.add_argument("--no-speed", action="store_true", help="skip the 100,000-image timing")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--episodes", type=int, default=120, help="test episodes per condition")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--pool-size", type=int, default=100)
    parser.add_argument("--query-size", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0, help="the learned selectors' training seed")
    parser.add_argument("--balanced", type=float, default=0.25, help="set selector: share of balanced steps")
    parser.add_argument(
        "--average-steps", type=int, help="set selector: weight averaging's time constant (0: ship the best step)"
    )
    parser.add_argument(
        "--no-read-embedding", action="store_true", help="set selector: a policy of the pool-relative features alone"
    )
    parser.add_argument("--learning-rate", type=float, help="set selector: Adam's learning rate (default: the model's)")
    parser.add_argument(
        "--distil", action="store_true", help="set selector: distilled from the LSTM run (`--teacher`), not REINFORCE"
    )
    parser.add_argument("--hidden", type=int, help="set selector: hidden width (default: the model's)")
    parser.add_argument(
        "--permute-test-rows",
        type=int,
        metavar="SEED",
        help="present the held-out test rows in a seeded random order, not the store's (does row order carry labels?)",
    )
    parser.add_argument("--adapt", action="store_true", help="also adapt the set selector to each away store")
    parser.add_argument("--adapt-minutes", type=float, default=3.0)
    parser.add_argument(
        "--choose-fallback",
        action="store_true",
        help="also choose the set selector's fallback on the other away source",
    )
    parser.add_argument("--fallback-episodes", type=int, default=60, help="--choose-fallback: episodes per condition")
    parser.add_argument("--mixed", action="store_true", help="also train a set selector on every source's patients")
    parser.add_argument(
        "--leave-one-out",
        action="store_true",
        help="also train a set selector on every source but one away hospital and test it there",
    )
    parser.add_argument("--last-step", action="store_true", help="also run the set selector's last training step")
    parser.add_argument("--stretch", action="store_true", help="also compare K picks with all pool labels at home")
    parser.add_argument(
        "--with-hospital",
        action="append",
        default=[],
        choices=[group for group, (*_, negative) in AWAY.items() if negative == NEGATIVE_DEFAULT],
        help="also train both selectors on this away group's training patients and conditions (repeatable)",
    )
    parser.add_argument("--runs", type=Path, default=Path(__file__).parent / "results" / "setselect")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    name = args.name or args.encoder
    store = pack_store(args)
    test_patient = test_patients(store)
    source = store.meta["Source"]
    train_store, hospitals = training_hospitals(store, test_patient, args.with_hospital)
    runs = args.runs / "-with-".join([name, *(group.split()[0].lower() for group in args.with_hospital)])
    lstm = train(train_store, runs / "lstm", "lstm", args, **hospitals)["checkpoint"]
    distilled = {"teacher": lstm} if args.distil else {}
    set_dir = runs / ("set-distilled" if args.distil else "set")
    set_selector = train(train_store, set_dir, "set", args, **hospitals, **distilled)["checkpoint"]
    learned = {"medselect": lstm, "setselect": set_selector}
    previous = json.loads(args.json.read_text()) if args.json and args.json.exists() else {}
    # an earlier run's rows are kept, except the adaptation's when it runs again
    report = [row for row in previous.get("rows", []) if not (args.adapt and row["variant"].startswith("adapted"))]
    done = {row["group"] for row in report}
    timings = previous.get("speed_seconds") or (
        None if args.no_speed else speed(store, learned["setselect"], args.encoder, runs)
    )
    specs = [*HEURISTICS, "oracle-balanced", *(f"{name}={ckpt}" for name, ckpt in learned.items())]
    raw_specs = [f"{name}={ckpt}" for name, ckpt in learned.items()]
    common = {"k": [args.k], "episodes": args.episodes, "pool_size": args.pool_size, "query_size": args.query_size}
    stores = {}
    for group, (sources, conditions, negative) in GROUPS.items():
        stores[group] = test = held_out(store, source.isin(sources).to_numpy() & test_patient, args)
        if group in done:
            continue
        for variant, chosen, gate in (("gated", specs, True), ("raw", raw_specs, False)):
            result = evaluate(
                test, conditions, selectors=chosen, negative=negative, trust_gate=gate, show_progress=False, **common
            )
            report += rows(result, group, variant)
        report += rows(set_vs_lstm(result), group, "set − LSTM")
        print(f"{group}: done", flush=True)
        save(args, learned, timings, report)
    for group, sources in ARCHIVES.items():
        if group in done:
            continue
        test = held_out(store, source.isin(sources).to_numpy() & test_patient, args)
        for variant, chosen, gate in (("gated", specs, True), ("raw", raw_specs, False)):
            result = evaluate(
                test, None, selectors=chosen, protocol="archive", trust_gate=gate, show_progress=False, **common
            )
            report += rows(result, group, variant)
        print(f"{group}: done", flush=True)
        save(args, learned, timings, report)
    away = [group for group in AWAY if group not in args.with_hospital]  # hospitals none of the selectors saw
    if args.adapt:
        from xsel.train.selector import adapt_selector

        for group in away:
            _, conditions, negative = GROUPS[group]
            run_dir = runs / f"set-adapted-{group.split()[0].lower()}"
            if not (run_dir / "selector.pt").exists():
                adapt_selector(learned["setselect"], stores[group], run_dir, max_minutes=args.adapt_minutes)
            for variant, gate in (("adapted", True), ("adapted raw", False)):
                result = one_set_selector(
                    stores[group], conditions, run_dir, common, negative=negative, trust_gate=gate
                )
                report += rows(result, group, variant)
            save(args, learned, timings, report)
    if args.choose_fallback:
        fallback_chosen_away(args, runs, away, store, test_patient, learned, stores, common, report, timings)
    if args.mixed:
        trained_on_every_source(args, store, test_patient, learned, common, report, timings)
    if args.leave_one_out:
        trained_without_the_site(args, store, test_patient, learned, stores, common, report, timings)
    variants = {row["variant"] for row in report}
    if args.last_step and "last step raw" not in variants:
        run_dir = last_step_checkpoint(set_dir)
        for group in GROUPS:
            _, conditions, negative = GROUPS[group]
            result = one_set_selector(stores[group], conditions, run_dir, common, negative=negative, trust_gate=False)
            report += rows(result, group, "last step raw")
        save(args, learned, timings, report)
    if args.stretch and "vs all pool labels" not in variants:
        report += all_pool_labels(stores["NIH unseen"], learned["setselect"], common)
        save(args, learned, timings, report)
    print_tables(report)


def training_hospitals(store, test_patient: np.ndarray, groups: list[str]) -> tuple:
    """The training store — NIH's training patients, plus those of each away ``group`` named — and the training
    settings that go with more than one hospital: the groups' conditions join NIH's seen ones, and each condition's
    episodes stay within the sources that label it (``--episodes-within Source``)."""
    sources, changes = [*NIH], {}
    if groups:
        conditions = [condition for group in groups for condition in GROUPS[group][1]]
        sources += [source for group in groups for source in GROUPS[group][0]]
        changes = {"conditions": [*SEEN, *conditions], "episodes_within": "Source"}
    return store.subset(store.meta["Source"].isin(sources).to_numpy() & ~test_patient), changes


def held_out(store, mask: np.ndarray, args):
    """The test rows of ``mask``, in store order or, with ``--permute-test-rows``, in a seeded random order: a
    selector that reads a pool in row order (the LSTM) gains nothing from an order that follows the labels."""
    rows = np.flatnonzero(mask)
    if args.permute_test_rows is not None:
        rows = np.random.default_rng(args.permute_test_rows).permutation(rows)
    return store.subset(rows)


def add_pack_store_arguments(parser) -> None:
    """The options :func:`pack_store` reads: the encoder, its weights and image size, the store's name and cache."""
    parser.add_argument("--encoder", default="efficientnet-lite0")
    parser.add_argument("--weights", help="encoder weights, e.g. RUN/encoder.pt of `xsel train encoder`")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--name", help="name of this encoder's store and runs (default: --encoder)")
    parser.add_argument("--cache", type=Path, default=Path(__file__).parent / "results" / "stores")


def pack_store(args):
    """The realcxr pack embedded with ``--encoder`` (``--weights``, ``--image-size``), cached in ``--cache`` as
    ``realcxr-NAME.h5`` (NAME: ``--name`` or the encoder)."""
    args.cache.mkdir(parents=True, exist_ok=True)
    path = args.cache / f"realcxr-{args.name or args.encoder}.h5"
    if not path.exists():
        options = {"weights": args.weights, "image_size": args.image_size}
        embed(REALCXR / "labels.csv", path, encoder=args.encoder, show_progress=False, **options)
    return read_store(path)


def one_set_selector(test, conditions, run_dir: Path, common: dict, **options):
    """The set selector of ``run_dir`` (and random, always included) on a test store."""
    selectors = [f"setselect={run_dir / 'selector.pt'}"]
    return evaluate(test, conditions, selectors=selectors, show_progress=False, **common, **options)


def trained_on_every_source(args, store, test_patient, learned, common, report, timings) -> None:
    """A set selector trained on the training patients of every source (``--conditions all``, negatives "No
    Finding"), then the archive protocol again: does training on everything labelled close the mixed-archive gap?"""
    from xsel.train.selector import ALL_CONDITIONS

    run_dir = args.runs / (args.name or args.encoder) / "set-every-source"
    train(store.subset(~test_patient), run_dir, "set", args, conditions=[ALL_CONDITIONS])
    source = store.meta["Source"]
    for group, sources in ARCHIVES.items():
        if any(r["group"] == group and r["variant"].startswith("every source") for r in report):
            continue
        test = held_out(store, source.isin(sources).to_numpy() & test_patient, args)
        for variant, gate in (("every source", True), ("every source raw", False)):
            result = one_set_selector(test, None, run_dir, common, protocol="archive", trust_gate=gate)
            report += rows(result, group, variant)
        save(args, learned, timings, report)


def trained_without_the_site(args, store, test_patient, learned, stores, common, report, timings) -> None:
    """For each away hospital, a set selector trained on the training patients of every other source (``--conditions
    all``, NIH's validation conditions) and tested on that hospital's test patients, raw and gated: does training on
    more than one hospital make a policy that pays at a hospital it never saw?"""
    from xsel.train.selector import ALL_CONDITIONS

    source = store.meta["Source"]
    for group in ("Kermany", "COVID sources"):
        if any(r["group"] == group and r["variant"].startswith("without this site") for r in report):
            continue
        sources, conditions, negative = GROUPS[group]
        run_dir = args.runs / (args.name or args.encoder) / f"set-without-{group.split()[0].lower()}"
        others = store.subset(~source.isin(sources).to_numpy() & ~test_patient)
        train(others, run_dir, "set", args, conditions=[ALL_CONDITIONS])
        for variant, gate in (("without this site", True), ("without this site raw", False)):
            result = one_set_selector(stores[group], conditions, run_dir, common, negative=negative, trust_gate=gate)
            report += rows(result, group, variant)
        save(args, learned, timings, report)


def fallback_chosen_away(args, runs, away, store, test_patient, learned, stores, common, report, timings) -> None:
    """The set selector's trust-gate fallback chosen on another away source (its patients outside the test split),
    then the gated selector on each away test store: Kermany's fallback chosen on the COVID sources and vice versa,
    so neither decision saw the hospital it is judged on. Only between hospitals the selectors never trained on
    (``away``); the chosen checkpoints go beside the runs they re-gate (``runs``)."""
    from xsel.train.selector import choose_fallback

    source = store.meta["Source"]
    for group, other in ((group, other) for group in away for other in away if other != group):
        variant = f"fallback chosen on {other}"
        if any(r["group"] == group and r["variant"] == variant for r in report):
            continue
        sources, conditions, negative = GROUPS[other]
        run_dir = runs / f"set-fallback-{other.split()[0].lower()}"
        if not (run_dir / "selector.pt").exists():
            calibration = store.subset(source.isin(sources).to_numpy() & ~test_patient)
            choice = choose_fallback(
                learned["setselect"],
                calibration,
                run_dir,
                conditions=conditions,
                negative=negative,
                episodes=args.fallback_episodes,
                show_progress=False,
            )
            print(f"{group}: fallback chosen on {other}: {choice.fallback} {choice.auroc}", flush=True)
        _, conditions, negative = GROUPS[group]
        result = one_set_selector(stores[group], conditions, run_dir, common, negative=negative)
        report += rows(result, group, variant)
        save(args, learned, timings, report)


def last_step_checkpoint(run_dir: Path) -> Path:
    """The run's last trained weights (``last.pt``, written at each validation) as a selector checkpoint in
    ``RUN/last-step``: the shipped file's entries (gate, settings) with those weights, their step and — in a run
    that does not average weights — their validation AUROC from ``metrics.csv`` (a run that averages validated the
    average, not them: no AUROC is claimed)."""
    import torch

    from xsel.train.checkpoints import save_torch_atomic

    shipped = torch.load(run_dir / "selector.pt", weights_only=True, map_location="cpu")
    last = torch.load(run_dir / "last.pt", weights_only=True, map_location="cpu")
    metrics = pd.read_csv(run_dir / "metrics.csv")
    validated = metrics.loc[metrics["step"] == last["step"], "val_auroc"].dropna().iloc[0]
    payload = {key: value for key, value in shipped.items() if key != "val_auroc"}
    payload |= {"state_dict": last["state_dict"], "step": last["step"]}
    if "averaged" not in last:
        payload["val_auroc"] = float(validated)
    save_torch_atomic(payload, run_dir / "last-step" / "selector.pt")
    print(f"set selector: last step {last['step']} (shipped step {shipped['step']})", flush=True)
    return run_dir / "last-step"


def all_pool_labels(test, checkpoint: str, common: dict) -> list[dict]:
    """Issue 16's stretch target: the set selector's K picks (gate on) and random K against all the pool's labels
    (random with K = pool size; the set selector's rows at that K are left out), paired on the same NIH-unseen
    episodes."""
    _, conditions, negative = GROUPS["NIH unseen"]
    settings = common | {"k": [common["k"][0], common["pool_size"]]}
    result = evaluate(
        test, conditions, selectors=[f"setselect={checkpoint}"], negative=negative, show_progress=False, **settings
    )
    table, k = result.episodes, common["k"][0]
    whole_pool = table[(table["selector"] == REFERENCE) & (table["k"] == common["pool_size"])].assign(k=k)
    picked = table[table["k"] == k].replace({"selector": {REFERENCE: f"random K={k}"}})
    return rows(
        replace(result, summary=summarize(pd.concat([whole_pool, picked])), settings={}),
        "NIH unseen",
        "vs all pool labels",
    )


def save(args, learned: dict, timings, report: list[dict]) -> None:
    """The results so far as JSON (``--json``), rewritten after every group."""
    if args.json:
        payload = {"settings": vars(args) | {"learned": learned}, "speed_seconds": timings, "rows": report}
        args.json.write_text(json.dumps(payload, indent=2, default=str))


def print_tables(report: list[dict]) -> None:
    groups = list(dict.fromkeys(r["group"] for r in report))
    names = list(dict.fromkeys((r["selector"], r["variant"]) for r in report if r["selector"] != "random"))
    print("\n| selector | " + " | ".join(groups) + " |")
    print("|---|" + "---|" * len(groups))
    for selector, variant in names:
        cells = []
        for group in groups:
            match = [r for r in report if (r["selector"], r["variant"], r["group"]) == (selector, variant, group)]
            if not match:
                cells.append("")
                continue
            r = match[0]
            low, high = r["diff_ci"]
            cell = f"{r['diff']:+.3f} [{low:+.3f}, {high:+.3f}]"
            if r["fell_back"]:
                cell += f" (fell back {r['fell_back']})"
            cells.append(cell)
        label = selector if variant == "gated" or selector in ("oracle-balanced",) else f"{selector} ({variant})"
        print(f"| {label} | " + " | ".join(cells) + " |")
    randoms = {r["group"]: r["auroc"] for r in report if r["selector"] == "random" and r["variant"] == "gated"}
    print("| random (AUROC) | " + " | ".join(f"{randoms.get(g, float('nan')):.3f}" for g in groups) + " |")


if __name__ == "__main__":
    main()
