"""Benchmark: the site runtime (onnxruntime) against the PyTorch path, measured in one run.

1. End to end on the same images: ``xsel select CSV --bundle`` (decode + ONNX encoder + ONNX selector)
   vs ``xsel embed`` + ``xsel select --checkpoint`` (PyTorch), in images/s, runs alternating.
2. Selector latency for pools of 1k / 10k / 100k: the exported ``selector.onnx`` vs the PyTorch scorer.

Uses the first ``--images`` real chest X-rays of ../shared/data/realcxr (synthetic demo images if the
pack is absent) and an untrained selector (speed does not depend on its weights).

    python bench/bench_site.py [--encoder resnet18] [--images 1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from benchlib import image_csv, summary


def untrained_checkpoint(store_path: Path, run_dir: Path) -> Path:
    """A selector checkpoint with the store's encoder identity and random weights."""
    from xsel.store import read_store
    from xsel.train.medselect import MedSelectScorer, SelectorConfig, save_checkpoint

    store = read_store(store_path)
    run_dir.mkdir(parents=True, exist_ok=True)
    scorer = MedSelectScorer(store.embeddings.shape[1])
    identity = store.encoder_identity
    config = SelectorConfig(conditions=["x"], val_conditions=["y"])
    save_checkpoint(run_dir / "selector.pt", scorer=scorer, config=config, identity=identity, extra={})
    return run_dir / "selector.pt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pools", default="1000,10000,100000")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch

    from xsel.bundle import Bundle
    from xsel.embed import embed
    from xsel.selection import select
    from xsel.site import site_select
    from xsel.train.export import export_bundle
    from xsel.train.medselect import MedSelectSelector

    weights = "none" if args.encoder in ("resnet18", "resnet50", "densenet121") else None
    results = {"encoder": args.encoder, "images": args.images, "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        csv = image_csv(args.images, folder)
        embed(csv, folder / "warm.h5", encoder=args.encoder, weights=weights, show_progress=False)
        checkpoint = untrained_checkpoint(folder / "warm.h5", folder / "run")
        export_bundle(folder / "bundle", encoder=args.encoder, weights=weights, selector=checkpoint)
        onnx_speed, torch_speed = [], []
        for repeat in range(args.repeats):
            began = time.perf_counter()
            site = site_select(csv, folder / "bundle", 20, out=folder / f"site{repeat}.csv", show_progress=False)
            onnx_speed.append(args.images / (time.perf_counter() - began))
            began = time.perf_counter()
            store = folder / f"torch{repeat}.h5"
            embed(csv, store, encoder=args.encoder, weights=weights, precision="fp32", show_progress=False)
            workstation = select(store, 20, checkpoint=checkpoint)
            torch_speed.append(args.images / (time.perf_counter() - began))
            same = site.table["Path"].tolist() == workstation.table["Path"].tolist()
        results["end_to_end_images_per_s"] = {"onnxruntime": summary(onnx_speed), "pytorch": summary(torch_speed)}
        results["end_to_end_ratio"] = statistics.median(onnx_speed) / statistics.median(torch_speed)
        results["same_selection"] = same
        print(
            f"{args.encoder}, {args.images} images, select K=20 end to end ({args.repeats} runs, images/s):\n"
            f"  onnxruntime site path : median {statistics.median(onnx_speed):7.1f} "
            f"(min {min(onnx_speed):.1f}, max {max(onnx_speed):.1f})\n"
            f"  PyTorch path          : median {statistics.median(torch_speed):7.1f} "
            f"(min {min(torch_speed):.1f}, max {max(torch_speed):.1f})\n"
            f"  ratio {results['end_to_end_ratio']:.2f}×; same selected paths: {same}",
            flush=True,
        )
        bundle = Bundle.load(folder / "bundle", device="cpu")
        learned = MedSelectSelector(checkpoint)
        dim = bundle.selector["input_dim"]
        results["selector_ms"] = []
        for pool in [int(p) for p in args.pools.split(",")]:
            inputs = np.random.default_rng(0).normal(size=(pool, dim)).astype(np.float32)
            timings = {"onnxruntime": [], "pytorch": []}
            bundle.scores(inputs[:100], 20)  # warm-up
            for _ in range(args.repeats):
                began = time.perf_counter()
                bundle.scores(inputs, 20)
                timings["onnxruntime"].append((time.perf_counter() - began) * 1000)
                began = time.perf_counter()
                learned.select(inputs, 20, seed=0)
                timings["pytorch"].append((time.perf_counter() - began) * 1000)
            row = {"pool": pool, **{name: summary(values) for name, values in timings.items()}}
            results["selector_ms"].append(row)
            print(
                f"  selector, pool {pool:>7,}: onnxruntime {row['onnxruntime']['median']:9.1f} ms, "
                f"PyTorch {row['pytorch']['median']:9.1f} ms "
                f"(ratio {row['pytorch']['median'] / row['onnxruntime']['median']:.2f}×)",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
