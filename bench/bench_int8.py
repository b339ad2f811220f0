"""Benchmark: the int8 site encoder (``xsel export --quantize int8``) against the fp32 ONNX encoder.

On the same decoded images: onnxruntime images/s of each encoder (runs alternating, median), the embeddings'
cosine agreement, the overlap of typiclust's K=20 picks, and the evaluate AUROC of typiclust with each store on the
same episodes. The int8 bundle is calibrated on the same images, with the agreement recorded but not required, so
the figures are reported even where ``xsel export`` would refuse the bundle.

Uses a seeded sample of ``--images`` real chest X-rays from ../shared/data/realcxr (synthetic demo images if the pack
is absent). Encoders without offline weights run with random weights (``--weights none``).

    python bench/bench_int8.py [--encoder efficientnet-lite0] [--weights W] [--images 500] [--repeats 3] [--json FILE]
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


def auroc(embeddings: np.ndarray, table, condition: str, episodes: int) -> float:
    """Mean AUROC of typiclust's K picks over seeded episodes (the same episodes for any embeddings of the table)."""
    from xsel.evaluate import evaluate
    from xsel.store import Store

    meta = table.frame.drop(columns=["Path"])
    store = Store(path=table.csv_path, embeddings=embeddings, paths=table.paths, meta=meta, attrs={})
    pool = len(embeddings) // 2
    result = evaluate(
        store,
        [condition],
        selectors=["typiclust"],
        k=[min(20, pool // 2)],
        episodes=episodes,
        pool_size=pool,
        query_size=len(embeddings) // 4,
        show_progress=False,
    )
    episodes = result.episodes
    return float(episodes.loc[episodes["selector"] == "typiclust", "auroc"].mean())


def measure(
    encoder: str,
    *,
    weights_given: str | None = None,
    n_images: int = 500,
    batch: int = 32,
    repeats: int = 3,
    condition: str = "COVID-19",
    episodes: int = 20,
) -> dict:
    """fp32 vs int8 onnxruntime encoders of one encoder on the same images: speed, cosine, pick overlap, AUROC."""
    from xsel.bundle import ENCODER_FILE, make_session
    from xsel.errors import InputError
    from xsel.io.images import load_image
    from xsel.io.table import read_image_table
    from xsel.selectors import create_selector
    from xsel.train.export import export_bundle

    weights = weights_given or ("none" if encoder in RANDOM_WEIGHTS else None)
    results = {"encoder": encoder, "weights": weights or "default", "images": n_images, "batch": batch}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        csv = sample_csv(n_images, tmp)
        export_bundle(tmp / "fp32", encoder=encoder, weights=weights)
        manifest = export_bundle(
            tmp / "int8",
            encoder=encoder,
            weights=weights,
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
        typiclust = create_selector("typiclust")
        picks = [set(typiclust.select(e, 20, seed=0).tolist()) for e in (fp32, int8)]
        results |= {
            "images_per_s": {name: statistics.median(values) for name, values in rates.items()},
            "cosine_min": float(cosine.min()),
            "cosine_mean": float(cosine.mean()),
            "typiclust_k20_picks_unchanged": len(picks[0] & picks[1]) / 20,
        }
        results["speedup"] = results["images_per_s"]["int8"] / results["images_per_s"]["fp32"]
        try:
            results["auroc"] = {name: auroc(e, table, condition, episodes) for name, e in embeddings.items()}
            results["auroc"] |= {"condition": condition, "episodes": episodes}
        except InputError as error:  # too few positives in a small sample
            results["auroc"] = f"skipped: {error}"
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="efficientnet-lite0")
    parser.add_argument("--weights", help="Weights as in `xsel embed` (default: random for torchvision CNNs).")
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--condition", default="COVID-19")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = measure(
        args.encoder, weights_given=args.weights, n_images=args.images, batch=args.batch, repeats=args.repeats,
        condition=args.condition, episodes=args.episodes,
    )  # fmt: skip
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
