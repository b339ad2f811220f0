"""Benchmark: `xsel embed` images/s for each built-in encoder × runtime/precision, in one run, with the share of the
FLOP-bound rate: dense-matmul GFLOP/s of the precision ÷ the encoder's GFLOPs per image (torch FlopCounterMode,
multiply-add = 2), as ``run_all.py`` computes it for resnet18.

Each path runs through the library call ``xsel.embed.embed`` on the same images, the exported encoder's cache
already filled (the export is paid once per encoder, not per run). ``auto``, the default, is the onnxruntime row
wherever onnxruntime is installed. Beside it, ``forward only``: the same path's forward pass alone on the images
decoded beforehand (batches of 32), so the table shows what the encoder itself reaches and what decoding costs on
top of it on this machine's cores. For the default path, the archive rate: runs of N and 4N images alternated, the
images added ÷ the seconds added — the rate an archive of 10⁵ images is embedded at, without what one run pays once.

    python bench/bench_runtimes.py [--images 256] [--repeats 1] [--encoders resnet18,pixels]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from benchlib import image_csv

ENCODERS = ("resnet18", "densenet121", "efficientnet-lite0", "pixels")
ARCHIVE_FACTOR = 4  # the archive rate compares runs of N and 4N images
PATHS = {  # label → (runtime, precision, the matmul rate that bounds it)
    "torch fp32": ("torch", "fp32", "fp32"),
    "torch bf16": ("torch", "bf16", "bf16"),
    "onnx fp32": ("onnx", "fp32", "fp32"),
}


def gflops_per_image(model) -> float:
    """The encoder's forward cost at its own input size (multiply-add = 2)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    pre = model.preprocessing
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.randn(1, int(pre["channels"]), int(pre["image_size"]), int(pre["image_size"])))
    return counter.get_total_flops() / 1e9


def forward_rate(encoder: str, runtime: str, precision: str, csv: Path, repeats: int) -> float:
    """Images/s of the path's forward pass alone on decoded batches of 32 (median of ``repeats`` passes)."""
    import time

    import numpy as np
    import torch

    from xsel.encoders import create_encoder, model_identity
    from xsel.io.images import load_image
    from xsel.io.table import read_image_table
    from xsel.train.inference import local_forward
    from xsel.train.runtime import autocast_dtype

    model = create_encoder(encoder, "none")
    device = torch.device("cpu")
    amp_dtype = autocast_dtype(precision, device)
    forward, _ = local_forward(
        model, model_identity(encoder, model), runtime, requested=runtime, device=device, amp_dtype=amp_dtype
    )
    images = np.stack(
        [load_image(path, model.preprocessing) for path in read_image_table(csv, show_progress=False).files]
    )
    batches = [torch.from_numpy(images[start : start + 32]) for start in range(0, len(images), 32)]
    forward(batches[0])  # warm-up: first-call allocations and kernel choices
    rates = []
    for _ in range(repeats):
        began = time.perf_counter()
        for batch in batches:
            forward(batch)
        rates.append(len(images) / (time.perf_counter() - began))
    return statistics.median(rates)


def runtime_rows(
    csv: Path, folder: Path, encoders, repeats: int, matmul: dict[str, float], archive_csv: Path | None = None
) -> list[dict]:
    """One row per encoder × path: images/s of ``xsel embed`` and of the forward pass alone (median of
    ``repeats``), and their shares of the FLOP-bound rate. With ``archive_csv`` (more images than ``csv``), the
    default path also gets its archive rate: the images added ÷ the seconds added between the two runs, alternated,
    so what a run pays once (starting the decode workers, the encoder's first call, the last shard's fsync) drops
    out, as it does over an archive of 10⁵ images."""
    from xsel import plugins
    from xsel.encoders import create_encoder
    from xsel.errors import InputError

    rows = []
    for encoder in encoders:
        try:
            plugins.get("encoder", encoder)
        except InputError:  # a plugin encoder that is not installed here
            print(f"{encoder}: not installed, skipped", flush=True)
            continue
        gflops = gflops_per_image(create_encoder(encoder, "none"))
        for label, (runtime, precision, bound) in PATHS.items():
            if runtime == "onnx":
                embed_once(csv, folder, encoder, runtime, precision)  # fills the exported encoder's cache
            runs, archive_runs = [], []
            for _ in range(repeats):
                runs.append(embed_once(csv, folder, encoder, runtime, precision))
                if archive_csv is not None and runtime == "onnx":
                    archive_runs.append(embed_once(archive_csv, folder, encoder, runtime, precision))
            speed = statistics.median(run.images_per_second for run in runs)
            archive = None
            if archive_runs and archive_runs[0].rows > runs[0].rows:
                added = archive_runs[0].rows - runs[0].rows
                seconds = [statistics.median(run.seconds for run in group) for group in (archive_runs, runs)]
                archive = added / (seconds[0] - seconds[1])
            forward = forward_rate(encoder, runtime, precision, csv, repeats)
            limit = matmul[bound] / gflops if gflops > 0.01 else None  # pixels does next to no arithmetic
            rows.append(
                {
                    "encoder": encoder,
                    "path": label,
                    "gflops": gflops,
                    "images_per_s": speed,
                    "archive_images_per_s": archive,
                    "forward_images_per_s": forward,
                    "limit": limit,
                }
            )
            extra = f", archive rate {archive:8.1f}" if archive else ""
            print(f"{encoder:20s} {label:11s} {speed:8.1f} images/s{extra}, forward only {forward:8.1f}", flush=True)
    return rows


def embed_once(csv: Path, folder: Path, encoder: str, runtime: str, precision: str):
    from xsel.embed import embed

    return embed(
        csv,
        folder / "s.h5",
        encoder=encoder,
        weights="none",
        runtime=runtime,
        precision=precision,
        overwrite=True,
        show_progress=False,
    )


def markdown(rows: list[dict]) -> list[str]:
    lines = [
        "| encoder | GFLOPs/image | path | `xsel embed` images/s | share of FLOP-bound rate "
        "| archive rate, images/s | its share | forward only images/s | its share |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = []
        for key in ("images_per_s", "archive_images_per_s", "forward_images_per_s"):
            value = row.get(key)
            if value is None:
                cells += ["—", "—"]
                continue
            share = f"{value / row['limit']:.0%}" if row["limit"] else "— (decode-bound)"
            cells += [f"{value:,.1f}", share]
        lines.append(f"| {row['encoder']} | {row['gflops']:.2f} | {row['path']} | {' | '.join(cells)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--encoders", default=",".join(ENCODERS))
    args = parser.parse_args()

    import torch
    from run_all import matmul_gflops

    matmul = {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16)}
    print(f"matmul: {matmul['fp32']:,.0f} GFLOP/s fp32, {matmul['bf16']:,.0f} bf16", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "run").mkdir()
        (folder / "archive").mkdir()
        csv = image_csv(args.images, folder / "run")
        archive_csv = image_csv(ARCHIVE_FACTOR * args.images, folder / "archive")
        rows = runtime_rows(csv, folder, args.encoders.split(","), args.repeats, matmul, archive_csv)
    print("\n".join(markdown(rows)))


if __name__ == "__main__":
    main()
