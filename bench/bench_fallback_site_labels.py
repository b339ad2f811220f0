"""Which heuristic a trust gate should fall back to at a hospital it never saw, and how many site labels decide it.

Training chooses the fallback on the training hospitals (20 episodes per condition); the gate hands it the pools of
other hospitals. For one trained selector (``--checkpoint``, e.g. the set selector of ``bench_realcxr_setselect.py
--with-hospital Kermany``) and the pack store it was trained from (``--cache``/``--name``, as that script keeps it):

1. every fallback candidate on the training hospitals' patients with ``--training-episodes`` per condition (the
   run's conditions and validation conditions, episodes within sources as the run drew them): the ranking the
   training referee sees, with its noise made small;
2. the candidates on the away site's held-out test patients (``--site``; 120 episodes per condition, seed 0, as
   ``bench_realcxr_setselect.py`` tests them; ``learned`` is the selector itself, gate off): the ranking that pays.
   Every evaluation here uses the checkpoint's K, pool and query sizes and classifier;
3. ``xsel train selector SITE --choose-fallback`` (:func:`xsel.train.selector.choose_fallback`) on ``--sizes``
   labelled images drawn from the site's *other* patients, ``--draws`` seeded draws each: which fallback it picks,
   whether its episodes decided it (every other candidate's paired CI below it; the CI resamples episodes, not
   the images they reuse), and what the pick gains on the test patients (its Δ vs random there).

    cd bench && python bench_fallback_site_labels.py --cache /work/benchdata --name moco-resnet18 \\
        --with-hospital Kermany --checkpoint /work/benchdata/runs-s1/moco-resnet18-with-kermany/set/selector.pt
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
from bench_realcxr_medselect import test_patients
from bench_realcxr_setselect import GROUPS, training_hospitals

from xsel.errors import InputError
from xsel.evaluate import evaluate
from xsel.store import read_store
from xsel.train.medselect import PLUGINS, load_selector_checkpoint
from xsel.train.selector import FALLBACK_CANDIDATES, choose_fallback
from xsel.trust import KEEP_LEARNED


def deltas(result, names: dict[str, str]) -> dict[str, tuple[float, float, float]]:
    """Each selector's Δ AUROC vs random over all conditions and its paired 95% CI, under the names given."""
    overall = result.summary[result.summary["condition"] == "all"].set_index("selector")
    columns = ["diff_vs_random", "diff_low", "diff_high"]
    return {shown: tuple(float(overall.loc[name, column]) for column in columns) for name, shown in names.items()}


def shown(delta: tuple[float, float, float] | None) -> str:
    return "—" if delta is None else f"{delta[0]:+.3f} [{delta[1]:+.3f}, {delta[2]:+.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, required=True, help="folder of the pack stores (realcxr-NAME.h5)")
    parser.add_argument("--name", required=True, help="the store's name, e.g. moco-resnet18 or efficientnet-lite0")
    parser.add_argument("--checkpoint", type=Path, required=True, help="a trained selector.pt carrying a trust gate")
    parser.add_argument("--with-hospital", action="append", default=[], help="hospitals it trained on beside NIH")
    parser.add_argument("--site", default="COVID sources", choices=sorted(GROUPS), help="the away site")
    parser.add_argument("--training-episodes", type=int, default=300)
    parser.add_argument("--episodes", type=int, default=60, help="--choose-fallback's episodes per condition")
    parser.add_argument("--sizes", type=int, nargs="+", default=[120, 200, 0], help="labelled site images (0: all)")
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    store = read_store(args.cache / f"realcxr-{args.name}.h5")
    payload, config = load_selector_checkpoint(args.checkpoint)
    test_patient, source = test_patients(store), store.meta["Source"]
    learned = f"{PLUGINS[config.model]}={args.checkpoint}"
    heuristics = {name: name for name in FALLBACK_CANDIDATES}
    test_settings = {  # as choose_fallback runs its episodes: the checkpoint's K, pool and query sizes, classifier
        "k": [config.k],
        "pool_size": config.pool_size,
        "query_size": config.query_size,
        "classifier": config.classifier,
        "show_progress": False,
        "trust_gate": False,
    }

    train_store, _ = training_hospitals(store, test_patient, args.with_hospital)
    at_training = evaluate(
        train_store,
        [*config.conditions, *config.val_conditions],
        selectors=list(heuristics),
        episodes=args.training_episodes,
        negative=config.negative,
        episodes_within=config.episodes_within,
        **test_settings,
    )
    sources, conditions, negative = GROUPS[args.site]
    site = source.isin(sources).to_numpy()
    test = store.subset(np.flatnonzero(site & test_patient))
    at_site = evaluate(
        test, conditions, selectors=[*heuristics, learned], episodes=120, negative=negative, **test_settings
    )
    site_delta = deltas(at_site, heuristics | {PLUGINS[config.model]: KEEP_LEARNED})
    ranking = {
        "training fallback": payload["trust_gate"]["fallback"],
        "at training hospitals": deltas(at_training, heuristics),
        "at the site (test patients)": site_delta,
    }

    other = np.flatnonzero(site & ~test_patient)
    choices = []
    with tempfile.TemporaryDirectory() as folder:
        for size in args.sizes:
            for draw in range(args.draws):
                drawn = min(size, len(other)) or len(other)
                rows = np.sort(np.random.default_rng([draw, size]).choice(other, drawn, replace=False))
                try:
                    choice = choose_fallback(
                        args.checkpoint,
                        store.subset(rows),
                        Path(folder) / f"{size}-{draw}",
                        conditions=conditions,
                        negative=negative,
                        episodes=args.episodes,
                        seed=draw,
                        show_progress=False,
                    )
                except InputError as error:  # too few images of a class (episodes take one image per patient)
                    print(f"{len(rows)} labelled images, draw {draw}: {error}")
                else:
                    choices.append(
                        {"images": len(rows), "draw": draw, "fallback": choice.fallback, "decided": choice.decided}
                    )
                if drawn == len(other):
                    break  # every other image: one draw

    print(f"\n{args.name}, {args.checkpoint}: fallback chosen at training {ranking['training fallback']}\n")
    print(f"| candidate | training hospitals ({args.training_episodes} episodes per condition) | {args.site}, test |")
    print("|---|---|---|")
    for name in [*heuristics, KEEP_LEARNED]:
        print(f"| {name} | {shown(ranking['at training hospitals'].get(name))} | {shown(site_delta[name])} |")
    print(
        "\n| labelled site images | draws | fallback chosen | decided | test Δ of the choice, per draw "
        "| choices whose test CI lies above 0 |"
    )
    print("|---|---|---|---|---|---|")
    for images in dict.fromkeys(c["images"] for c in choices):
        runs = [c for c in choices if c["images"] == images]
        picked = ", ".join(f"{name} {count}" for name, count in Counter(c["fallback"] for c in runs).items())
        gains = "; ".join(f"{site_delta[c['fallback']][0]:+.3f}" for c in runs)
        decided, paying = sum(c["decided"] for c in runs), sum(site_delta[c["fallback"]][1] > 0 for c in runs)
        print(f"| {images} | {len(runs)} | {picked} | {decided}/{len(runs)} | {gains} | {paying}/{len(runs)} |")
    if args.json:
        args.json.write_text(json.dumps({"ranking": ranking, "choices": choices}, indent=1))


if __name__ == "__main__":
    main()
