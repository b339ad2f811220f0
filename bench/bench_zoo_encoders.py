"""Benchmark: `xsel embed` images/s of the field's encoders (torchxrayvision, timm CNNs and ViTs, RAD-DINO), with
resnet18 measured in the same run as the reference.

Every encoder runs with seeded random weights (`--weights none`: nothing to download; speed does not depend on the
weights) at its own published input size and preprocessing, on the same images (real chest X-rays from
../shared/data/realcxr when present, else synthetic demo images), fp32, through the real `xsel embed` path (decode
workers, batching, store). resnet18 runs first (after an untimed warm-up run) and last; the ratio column divides by
the mean of those two runs, and their spread shows how much the machine drifted during the run. With few images the
fixed cost of each run (decode workers starting) weighs most on the fastest encoders. Encoders whose plugin is not
installed are skipped.

    python bench/bench_zoo_encoders.py [--images 32] [--batch-size 16] [--encoders a,b,...] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

from benchlib import has_realcxr, image_csv

REFERENCE = "resnet18"
ENCODERS = (
    "xrv-densenet121",
    "xrv-resnet50",
    "xrv-autoencoder",
    "timm:resnet50",
    "timm:convnext_tiny",
    "timm:vit_small_patch16_224",
    "timm:vit_base_patch16_224",
    "rad-dino",
)


def embed_speed(csv: Path, out: Path, encoder: str, batch_size: int) -> tuple[float, dict]:
    """Images/s of `xsel embed` with random weights, and the encoder's embedding size and preprocessing."""
    from xsel.embed import embed
    from xsel.store import read_store

    result = embed(
        csv, out, encoder=encoder, weights="none", batch_size=batch_size, precision="fp32", overwrite=True,
        show_progress=False,
    )  # fmt: skip
    return result.images_per_second, {
        "embedding_dim": result.embedding_dim,
        "preprocessing": read_store(out).attrs["preprocessing"],
    }


def measure(images: int, batch_size: int, encoders: list[str]) -> dict:
    """Images/s of each installed encoder and of resnet18 before and after them, on the same images."""
    import torch

    from xsel import plugins
    from xsel.errors import InputError

    available = []
    for name in encoders:
        try:
            plugins.get("encoder", name)
            available.append(name)
        except InputError:
            print(f"skipping {name}: its plugin is not installed", file=sys.stderr)
    began = time.time()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        csv = image_csv(images, workdir)
        embed_speed(csv, workdir / "store.h5", REFERENCE, batch_size)  # warm-up: page cache, imports, JIT
        reference = [embed_speed(csv, workdir / "store.h5", REFERENCE, batch_size)[0]]
        for name in available:
            speed, info = embed_speed(csv, workdir / "store.h5", name, batch_size)
            rows.append({"encoder": name, "images_per_s": speed, **info})
            print(f"{name}: {speed:.2f} images/s", file=sys.stderr)
        reference.append(embed_speed(csv, workdir / "store.h5", REFERENCE, batch_size)[0])
    baseline = sum(reference) / len(reference)
    for row in rows:
        row["ratio_to_resnet18"] = row["images_per_s"] / baseline
    return {
        "benchmark": "zoo encoders",
        "images": images,
        "source": "realcxr" if has_realcxr() else "synthetic demo",
        "batch_size": batch_size,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "minutes": (time.time() - began) / 60,
        "resnet18_images_per_s": reference,
        "encoders": rows,
    }


def table_lines(result: dict) -> list[str]:
    """The result as Markdown: a one-line setting, then encoder × input × embedding × images/s × ratio."""
    reference = result["resnet18_images_per_s"]
    lines = [
        f"{result['images']} {result['source']} images, batch {result['batch_size']}, fp32, random weights; resnet18 "
        f"{reference[0]:.1f} images/s before and {reference[1]:.1f} after ({result['minutes']:.1f} min in all)",
        "",
        "| encoder | input | embedding | images/s | vs resnet18 |",
        "|---|---|---|---|---|",
    ]
    for row in result["encoders"]:
        pre = row["preprocessing"] or {}
        extras = ", ".join(f"{key} {pre[key]}" for key in ("crop", "crop_pct", "interpolation") if key in pre)
        size = f"{pre.get('image_size')} px, {pre.get('channels')} ch" + (f", {extras}" if extras else "")
        lines.append(
            f"| {row['encoder']} | {size} | {row['embedding_dim']}-d | {row['images_per_s']:.2f} | "
            f"{row['ratio_to_resnet18']:.2f}× |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--encoders", default=",".join(ENCODERS), help="Comma list of encoder names to measure.")
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    args = parser.parse_args()
    encoders = [name.strip() for name in args.encoders.split(",") if name.strip()]
    result = measure(args.images, args.batch_size, encoders)
    print("\n".join(table_lines(result)))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
