"""Benchmark: the int8 site encoder (``xsel export --quantize int8``) against the fp32 ONNX encoder.

On the same decoded images: onnxruntime images/s of each encoder (runs alternating, median), the embeddings'
cosine agreement, the overlap of the K=20 picks of every label-blind heuristic and of the bundle's learned selector
(``--selector NAME=CHECKPOINT``, trained on embeddings of this encoder), and the evaluate AUROC of each with either
encoder's embeddings on the same episodes. For scale, ``seed_overlap`` is the overlap of each heuristic's picks on
the fp32 embeddings with seed 0 and with seeds 1–5: how much the picks vary anyway. The int8 bundle is calibrated on
the same images, with the agreement recorded but not required, so the figures are reported even where
``xsel export`` would refuse the bundle.

Uses a seeded sample of ``--images`` real chest X-rays from ../shared/data/realcxr (synthetic demo images if the pack
is absent). Encoders without offline weights run with random weights (``--weights none``).

    python bench/bench_int8.py [--encoder efficientnet-lite0] [--weights W] [--selector NAME=CKPT] [--images 500]
                               [--repeats 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from benchlib import REALCXR, has_realcxr, image_csv

RANDOM_WEIGHTS = ("resnet18", "resnet50", "densenet121")
HEURISTICS = ("typiclust", "kcenter", "kmedoids", "probcover")
K = 20


def sample_csv(n_images: int, folder: Path) -> Path:
    """A seeded sample of the pack (its rows are grouped by source, so the first N would be one source)."""
    if not has_realcxr():
        return image_csv(n_images, folder)
    frame = pd.read_csv(REALCXR / "labels.csv").sample(n_images, random_state=0).reset_index(drop=True)
    frame["Path"] = [str(REALCXR / p) for p in frame["Path"]]
    csv = folder / "images.csv"
    frame.to_csv(csv, index=False)
    return csv


def images_per_second(session, batches: list[np.ndarray]) -> float:
    start = time.perf_counter()
    for batch in batches:
        session.run(None, {"images": batch})
    return sum(map(len, batches)) / (time.perf_counter() - start)


def auroc(embeddings: np.ndarray, table, identity: dict, selectors: dict, condition: str, episodes: int) -> dict:
    """AUROC of each selector's K picks per seeded episode (the same episodes for any embeddings of the table);
    ``selectors`` maps a label to an ``evaluate`` selector spec. The trust gate is off: a gate that hands
    the pool to a heuristic would compare the heuristic twice."""
    from xsel.evaluate import evaluate
    from xsel.selectors import parse_selector_spec
    from xsel.store import Store

    meta = table.frame.drop(columns=["Path"])
    store = Store(path=table.csv_path, embeddings=embeddings, paths=table.paths, meta=meta, attrs=identity)
    pool = len(embeddings) // 2
    result = evaluate(
        store,
        [condition],
        selectors=list(selectors.values()),
        k=[min(K, pool // 2)],
        episodes=episodes,
        pool_size=pool,
        query_size=len(embeddings) // 4,
        show_progress=False,
        trust_gate=False,  # the learned selector's own picks, as the export check compares them
    )
    rows = result.episodes.sort_values("episode")
    labels = {label: parse_selector_spec(spec)[0] for label, spec in selectors.items()}  # as evaluate names them
    return {label: rows.loc[rows["selector"] == name, "auroc"].to_numpy() for label, name in labels.items()}


def paired(fp32: np.ndarray, int8: np.ndarray) -> dict:
    """Mean AUROC with each encoder and the paired int8 − fp32 difference with its 95% t-interval."""
    from scipy import stats

    difference = int8 - fp32
    half = stats.t.ppf(0.975, len(difference) - 1) * difference.std(ddof=1) / np.sqrt(len(difference))
    mean = float(difference.mean())
    return {
        "fp32": float(fp32.mean()),
        "int8": float(int8.mean()),
        "difference": mean,
        "ci": [mean - half, mean + half],
    }


def overlap(first: np.ndarray, second: np.ndarray) -> float:
    return len(set(first.tolist()) & set(second.tolist())) / len(first)


def measure(
    encoder: str,
    *,
    weights_given: str | None = None,
    selector: str | None = None,
    n_images: int = 500,
    batch: int = 32,
    repeats: int = 3,
    condition: str = "COVID-19",
    episodes: int = 60,
) -> dict:
    """fp32 vs int8 onnxruntime encoders of one encoder on the same images: speed, cosine, pick overlap, AUROC.
    ``selector``: a learned selector ``NAME=CHECKPOINT`` to bundle (the export check then uses it)."""
    from xsel.bundle import ENCODER_FILE, make_session
    from xsel.errors import InputError
    from xsel.identity import encoder_identity
    from xsel.io.images import load_image
    from xsel.io.table import read_image_table
    from xsel.selectors import create_selector, parse_selector_spec
    from xsel.train.export import export_bundle

    weights = weights_given or ("none" if encoder in RANDOM_WEIGHTS else None)
    results = {"encoder": encoder, "weights": weights or "default", "selector": selector, "images": n_images}
    results["batch"] = batch
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        csv = sample_csv(n_images, tmp)
        export_bundle(tmp / "fp32", encoder=encoder, weights=weights, selector=selector)
        manifest = export_bundle(
            tmp / "int8",
            encoder=encoder,
            weights=weights,
            selector=selector,
            quantize="int8",
            calibration=csv,
            calibration_images=min(200, n_images),
            min_agreement=0.0,
        )
        results["export_check"] = manifest["quantization"]["agreement"]
        table = read_image_table(csv, show_progress=False)
        images = np.stack([load_image(path, manifest["encoder"]["preprocessing"]) for path in table.files])
        sessions = {name: make_session(tmp / name / ENCODER_FILE, "cpu") for name in ("fp32", "int8")}
        batches = [images[i : i + batch] for i in range(0, len(images), batch)]
        embeddings = {
            name: np.concatenate([session.run(None, {"images": batch})[0] for batch in batches])
            for name, session in sessions.items()
        }
        rates = {name: [] for name in sessions}
        for _ in range(repeats):  # alternating, so a busy moment on a shared machine hits both
            for name, session in sessions.items():
                rates[name].append(images_per_second(session, batches))
        fp32, int8 = embeddings["fp32"], embeddings["int8"]
        cosine = (fp32 * int8).sum(1) / (np.linalg.norm(fp32, axis=1) * np.linalg.norm(int8, axis=1))
        spec = {name: name for name in HEURISTICS}
        instances = {name: create_selector(name) for name in HEURISTICS}
        if selector:
            label, name, options = parse_selector_spec(selector)
            spec[label], instances[label] = selector, create_selector(name, **options)
        picks = {label: [one.select(e, K, seed=0) for e in (fp32, int8)] for label, one in instances.items()}
        results |= {
            "images_per_s": {name: statistics.median(values) for name, values in rates.items()},
            "cosine_min": float(cosine.min()),
            "cosine_mean": float(cosine.mean()),
            "picks_unchanged": {label: overlap(*pair) for label, pair in picks.items()},
            "seed_overlap": {
                name: statistics.mean(overlap(picks[name][0], one.select(fp32, K, seed=s)) for s in range(1, 6))
                for name, one in instances.items()
                if name in HEURISTICS
            },
        }
        results["speedup"] = results["images_per_s"]["int8"] / results["images_per_s"]["fp32"]
        if episodes == 0:
            return results
        entry = manifest["encoder"]
        identity = encoder_identity(entry["name"], entry["weights_sha256"], entry["preprocessing"])
        try:
            scores = {name: auroc(e, table, identity, spec, condition, episodes) for name, e in embeddings.items()}
            results["auroc"] = {label: paired(scores["fp32"][label], scores["int8"][label]) for label in spec}
            results["auroc"] |= {"condition": condition, "episodes": episodes}
        except InputError as error:  # too few positives in a small sample
            results["auroc"] = f"skipped: {error}"
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="efficientnet-lite0")
    parser.add_argument("--weights", help="Weights as in `xsel embed` (default: random for torchvision CNNs).")
    parser.add_argument("--selector", help="A learned selector NAME=CHECKPOINT to bundle, trained on this encoder.")
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--condition", default="COVID-19")
    parser.add_argument("--episodes", type=int, default=60, help="AUROC episodes (0: speed and agreement only)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = measure(
        args.encoder, weights_given=args.weights, selector=args.selector, n_images=args.images, batch=args.batch,
        repeats=args.repeats, condition=args.condition, episodes=args.episodes,
    )  # fmt: skip
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
