"""The trust gate with a reference per training hospital against the training images as one mixture, same weights.

For each set selector trained by ``bench_selector_stability.py --episodes-within-sources`` (``--run RUN=SOURCES``:
its run folder and the ``--with-sources`` it trained on beside NIH), the gate is calibrated afresh by this xsel on
the store it trained on (:func:`xsel.train.selector.recalibrate_gate`: a reference per hospital beside the
mixture's, the statistic to their nearest mixture), and the same gate without its hospitals' references (the
training images as one mixture, same threshold) is kept beside it. Both judge the test patients' episodes of
NIH's unseen conditions, Kermany and the COVID sources (120 paired episodes per condition, K=20): on how many
pools each fires, how many it hands to the fallback (none when the fallback is the learned selector itself), and
the gated selector's Δ AUROC vs random [paired 95% CI]. A hospital the run trained on should keep its pools;
one it never saw should not.
With ``--referee-minutes M``, a third gate: the per-hospital one with its fallback refereed leave-one-hospital-out
on the run's training store (:func:`xsel.train.selector.referee_away`, hospitals as ``HOSPITAL`` names them: NIH's
two sources are one hospital, the three COVID collections another; M minutes per selector trained without one).

    python bench/bench_gate_per_hospital.py --cache /work/benchdata \\
        --run RUNS/set-…-with-kermany-within=kermany --run RUNS/set-…-with-ieee8023-actualmed-figure1-within=ieee8023,…
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from bench_realcxr_medselect import NIH, test_patients
from bench_realcxr_setselect import COVID, GROUPS, add_pack_store_arguments, pack_store, rows

from xsel.evaluate import evaluate
from xsel.train.checkpoints import gate_from_payload, gate_payload, save_torch_atomic
from xsel.train.medselect import load_checkpoint
from xsel.train.selector import recalibrate_gate, referee_away

HOSPITAL = {"nih-talo": "NIH", "nih-zech": "NIH", "kermany": "Kermany", **dict.fromkeys(COVID, "COVID sources")}


def mixture_alone(checkpoint: Path) -> Path:
    """The checkpoint beside ``checkpoint`` whose gate is its mixture reference alone, same threshold."""
    gate = gate_from_payload(load_checkpoint(checkpoint))
    rows_of_mixture = len(gate.reference) - sum(group.rows for group in gate.groups)
    alone = dataclasses.replace(gate, reference=gate.reference[:rows_of_mixture], groups=())
    path = checkpoint.parent / "mixture" / "selector.pt"
    save_torch_atomic(torch.load(checkpoint, weights_only=True) | gate_payload(alone), path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pack_store_arguments(parser)
    parser.add_argument("--run", action="append", required=True, metavar="RUN=SOURCES")
    parser.add_argument("--episodes", type=int, default=120, help="test episodes per condition")
    parser.add_argument(
        "--referee-minutes", type=float, default=0.0, help="also referee the fallback away (minutes per selector)"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gate-per-hospital")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    store = pack_store(args)
    test_patient, source = test_patients(store), store.meta["Source"]
    common = {"k": [20], "episodes": args.episodes, "pool_size": 100, "query_size": 40, "show_progress": False}
    report = []
    for entry in args.run:
        run, _, sources = entry.rpartition("=")
        trained_on = [*NIH, *sources.split(",")]
        train_store = store.subset(source.isin(trained_on).to_numpy() & ~test_patient)
        out = args.out / Path(run).name
        grouped = recalibrate_gate(Path(run) / "selector.pt", train_store, out)
        gates = {"per hospital": grouped, "mixture alone": mixture_alone(grouped)}
        if args.referee_minutes:
            hospitals = train_store.meta.assign(Hospital=train_store.meta["Source"].map(HOSPITAL))
            refereed = referee_away(
                grouped,
                dataclasses.replace(train_store, meta=hospitals),
                out / "refereed",
                column="Hospital",
                max_minutes=args.referee_minutes,
                show_progress=False,
            )
            gates["refereed away"] = refereed.checkpoint
        for group, (group_sources, conditions, negative) in GROUPS.items():
            test = store.subset(source.isin(group_sources).to_numpy() & test_patient)
            for variant, checkpoint in gates.items():
                result = evaluate(
                    test,
                    conditions,
                    selectors=[f"setselect={checkpoint}"],
                    negative=negative,
                    trust_gate=True,
                    **common,
                )
                counts = result.settings["fell_back"]["setselect"].values()
                fired = f"{sum(c['fired'] for c in counts)}/{sum(c['episodes'] for c in counts)}"
                found = [r for r in rows(result, group, variant) if r["selector"] == "setselect"]
                away = not set(group_sources) & set(trained_on)
                report += [r | {"fired": fired, "trained_on": trained_on, "away": away} for r in found]
                r = report[-1]
                print(
                    f"{Path(run).name[-60:]:60} {group:14} {variant:13} fired {fired:>8}, fell back "
                    f"{r['fell_back']:>8}  {r['diff']:+.3f} [{r['diff_ci'][0]:+.3f}, {r['diff_ci'][1]:+.3f}]"
                    + ("  (away)" * away),
                    flush=True,
                )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
