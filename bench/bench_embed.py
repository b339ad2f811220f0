"""Benchmark: `xsel embed` images/s against a naive per-image loop, measured in the same run.

The naive loop is what a notebook usually does: PIL open → tensor → model, batch 1, no workers.
Both use the same encoder and the same images (real chest X-rays from ../shared/data/realcxr when
present, else synthetic demo images). Runs alternate (naive, xsel, naive, xsel, …) so machine noise
hits both; the report gives medians with min/max and the ratio of medians.

    python bench/bench_embed.py [--encoder resnet18] [--images 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from benchlib import has_realcxr, image_csv, summary
from PIL import Image


def naive_loop(files: list[Path], encoder) -> float:
    """Images/s of the per-image loop (decode, resize, normalise, forward with batch 1)."""
    import torch

    pre = encoder.preprocessing
    mean = torch.tensor(pre["mean"]).view(-1, 1, 1)
    std = torch.tensor(pre["std"]).view(-1, 1, 1)
    mode = "RGB" if pre["channels"] == 3 else "L"
    began = time.perf_counter()
    with torch.inference_mode():
        for path in files:
            image = Image.open(path).convert(mode).resize((pre["image_size"],) * 2, Image.Resampling.BILINEAR)
            array = np.asarray(image, dtype=np.float32) / 255.0
            tensor = torch.from_numpy(array if array.ndim == 3 else array[..., None]).permute(2, 0, 1)
            encoder(((tensor - mean) / std)[None])
    return len(files) / (time.perf_counter() - began)


def xsel_embed(csv: Path, out: Path, encoder: str, batch_size: int, workers: int | None, precision: str) -> float:
    from xsel.embed import embed

    result = embed(
        csv,
        out,
        encoder=encoder,
        batch_size=batch_size,
        workers=workers,
        precision=precision,
        runtime="torch",  # the PyTorch paths; bench_runtimes.py measures onnxruntime (the default where installed)
        overwrite=True,
        show_progress=False,
    )
    return result.images_per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="resnet18", help="Encoder plugin (try also: pixels, efficientnet-lite0).")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    args = parser.parse_args()

    import torch

    from xsel.encoders import create_encoder

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        csv = image_csv(args.images, workdir)
        frame = pd.read_csv(csv)
        files = [Path(p) if Path(p).is_absolute() else csv.parent / p for p in frame["Path"]]
        encoder = create_encoder(args.encoder)
        runs = {"naive per-image loop": [], "xsel embed fp32": [], "xsel embed bf16": []}
        for _ in range(args.repeats):
            runs["naive per-image loop"].append(naive_loop(files, encoder))
            for precision in ("fp32", "bf16"):
                speed = xsel_embed(csv, workdir / "store.h5", args.encoder, args.batch_size, args.workers, precision)
                runs[f"xsel embed {precision}"].append(speed)
    naive = statistics.median(runs["naive per-image loop"])
    result = {
        "benchmark": "embed",
        "encoder": args.encoder,
        "images": len(files),
        "source": "realcxr" if has_realcxr() else "synthetic demo",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "images_per_s": {
            name: {**summary(values), "ratio_to_naive": statistics.median(values) / naive}
            for name, values in runs.items()
        },
    }
    print(f"{args.encoder} on {result['images']} {result['source']} images, {args.repeats} runs each (images/s):")
    for name, row in result["images_per_s"].items():
        print(
            f"  {name:22s} median {row['median']:7.1f}  (min {row['min']:.1f}, max {row['max']:.1f})"
            f"  {row['ratio_to_naive']:.2f}× naive"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
