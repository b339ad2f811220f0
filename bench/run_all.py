"""Run the speed benchmarks in one go and write BENCHMARKS.md (machine, versions, date, every figure).

    python bench/run_all.py [--images 512] [--repeats 3] [--out BENCHMARKS.md]

Figures, each a median of ``--repeats`` runs with min/max, measured in this one process so that ratios
compare like with like on a noisy machine:
1. ``xsel embed`` images/s — local engine (PyTorch fp32 and bf16), the onnxruntime encoder of an
   exported bundle, the Ray engine on this machine — against the naive per-image loop; then every built-in
   encoder × runtime/precision (``bench_runtimes.py``) with its share of the FLOP-bound rate.
2. The FLOP-bound limit of the encoder here: measured fp32 matmul GFLOP/s ÷ the model's GFLOPs per
   image, and the fraction of it each path reaches.
3. Where the time of ``xsel embed`` goes: decode + preprocess, model, writing the store (per image).
4. Peak memory of ``xsel embed`` (pixels encoder, 32 px synthetic images) at 10k and 100k images.
5. Selector time against pool size (1k / 10k / 100k × 512) for every built-in selector.
6. ``xsel evaluate`` episodes/s.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_embed import naive_loop
from bench_runtimes import ARCHIVE_FACTOR, ENCODERS, markdown, runtime_rows
from bench_selectors import time_selectors
from benchlib import has_realcxr, image_csv

ROOT = Path(__file__).resolve().parents[1]


def spread(values: list[float], digits: int = 1) -> str:
    return f"{statistics.median(values):,.{digits}f} (min {min(values):,.{digits}f}, max {max(values):,.{digits}f})"


def matmul_gflops(dtype) -> float:
    import torch

    a, b = torch.randn(4096, 4096, dtype=dtype), torch.randn(4096, 4096, dtype=dtype)
    torch.mm(a, b)
    rates = []
    for _ in range(5):
        began = time.perf_counter()
        torch.mm(a, b)
        rates.append(2 * 4096**3 / (time.perf_counter() - began) / 1e9)
    return statistics.median(rates)


def embed_section(args, lines: list[str]) -> None:
    import torch

    from xsel.bundle import Bundle
    from xsel.embed import embed
    from xsel.encoders import create_encoder
    from xsel.io.images import load_image
    from xsel.store import write_store
    from xsel.train.export import export_bundle

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        csv = image_csv(args.images, folder)
        import pandas as pd

        files = [Path(p) for p in pd.read_csv(csv)["Path"]]
        model = create_encoder("resnet18", "none")
        export_bundle(folder / "bundle", encoder="resnet18", weights="none")
        bundle = Bundle.load(folder / "bundle", device="cpu")
        import ray

        runs: dict[str, list[float]] = {k: [] for k in ("naive", "fp32", "bf16", "onnxruntime", "ray")}
        for _ in range(args.repeats):
            runs["naive"].append(naive_loop(files, model))
            for precision in ("fp32", "bf16"):
                result = embed(
                    csv,
                    folder / "s.h5",
                    encoder="resnet18",
                    weights="none",
                    precision=precision,
                    runtime="torch",
                    overwrite=True,
                    show_progress=False,
                )
                runs[precision].append(result.images_per_second)
            began = time.perf_counter()
            bundle.embed_files(files, show_progress=False)
            runs["onnxruntime"].append(len(files) / (time.perf_counter() - began))
            ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR")  # up only while measured
            result = embed(
                csv,
                folder / "r.h5",
                encoder="resnet18",
                weights="none",
                engine="ray",
                runtime="torch",
                overwrite=True,
                show_progress=False,
            )
            runs["ray"].append(result.images_per_second)
            ray.shutdown()

        # FLOP-bound limit
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            model(torch.randn(1, 3, 224, 224))
        gflops_per_image = counter.get_total_flops() / 1e9
        matmul = {dtype: matmul_gflops(dtype) for dtype in (torch.float32, torch.bfloat16)}
        limits = {key: matmul[torch.bfloat16 if key == "bf16" else torch.float32] / gflops_per_image for key in runs}
        rates = {"fp32": matmul[torch.float32], "bf16": matmul[torch.bfloat16]}
        (folder / "archive").mkdir()
        archive_csv = image_csv(ARCHIVE_FACTOR * args.images, folder / "archive")
        encoder_rows = runtime_rows(csv, folder, ENCODERS, args.repeats, rates, archive_csv)

        # where the time goes (single process, per image)
        began = time.perf_counter()
        arrays = [load_image(path, model.preprocessing) for path in files]
        decode_ms = (time.perf_counter() - began) / len(files) * 1000
        batch = torch.from_numpy(np.stack(arrays[:64])).contiguous(memory_format=torch.channels_last)
        channels_last = model.to(memory_format=torch.channels_last)
        with torch.inference_mode():
            channels_last(batch[:8])
            began = time.perf_counter()
            embeddings = channels_last(batch).numpy()
        model_ms = (time.perf_counter() - began) / len(batch) * 1000
        began = time.perf_counter()
        many = np.repeat(embeddings, 16, axis=0)
        write_store(
            folder / "w.h5",
            embedding_chunks=[many],
            paths=[str(i) for i in range(len(many))],
            meta=pd.DataFrame(index=range(len(many))),
            attrs={},
        )
        write_ms = (time.perf_counter() - began) / len(many) * 1000

    naive = statistics.median(runs["naive"])
    lines += [
        "## 1. Embedding throughput",
        "",
        f"resnet18 at 224 px, {args.images} {'real chest X-rays (realcxr)' if has_realcxr() else 'synthetic images'}, "
        f"{args.repeats} runs each, images/s (median, min, max) and ratio of medians to the naive loop.",
        "",
        "| path | images/s | vs naive | share of FLOP-bound limit |",
        "|---|---|---|---|",
    ]
    names = {
        "naive": "naive loop (PIL → tensor → model, batch 1)",
        "fp32": "`xsel embed` local engine, fp32",
        "bf16": "`xsel embed` local engine, `--precision bf16`",
        "onnxruntime": "bundle encoder (onnxruntime, site path)",
        "ray": "`xsel embed --engine ray` (local Ray, 2 CPUs)",
    }
    for key, label in names.items():
        median = statistics.median(runs[key])
        lines.append(f"| {label} | {spread(runs[key])} | {median / naive:.2f}× | {median / limits[key]:.0%} |")
    lines += [
        "",
        f"Every built-in encoder through `xsel embed` ({args.images} images, median of {args.repeats}; `auto`, the "
        "default, runs the onnxruntime row when onnxruntime is installed; the share uses the matmul rate of the "
        f"path's precision, see section 2; the archive rate is the images added ÷ the seconds added from "
        f"{args.images} to {ARCHIVE_FACTOR * args.images} images, runs alternated):",
        "",
        *markdown(encoder_rows),
        "",
        "## 2. FLOP-bound limit",
        "",
        f"Dense matmul (4096², median of 5): {matmul[torch.float32]:,.0f} GFLOP/s in fp32, "
        f"{matmul[torch.bfloat16]:,.0f} in bf16; resnet18 at 224 px: {gflops_per_image:.2f} GFLOPs per image "
        f"(torch FlopCounterMode, multiply-add = 2) → a matmul-bound estimate of {limits['fp32']:,.0f} images/s in "
        f"fp32 and {limits['bf16']:,.0f} in bf16. oneDNN's convolutions can beat a plain matmul, so a share above "
        "100% means the estimate is conservative, not that the figure is wrong.",
        "",
        "## 3. Where the time of `xsel embed` goes (one process, per image)",
        "",
        f"decode + preprocess {decode_ms:.2f} ms; model (batch 64, fp32, channels-last) {model_ms:.2f} ms; writing "
        f"the store {write_ms:.4f} ms. The model dominates for CNNs "
        f"({model_ms / (decode_ms + model_ms + write_ms):.0%});"
        " decoding dominates for `pixels`. What changed because of it: decode workers default to one per core (the "
        "decode-bound `pixels` run went from 0.87× to 1.26× the naive loop), convolutions run channels-last, and "
        "`--precision bf16` is offered for model-bound CPU runs; store writes are negligible.",
        "",
    ]


def memory_section(args, lines: list[str]) -> None:
    from PIL import Image

    lines += [
        "## 4. Peak memory of `xsel embed` (pixels, 32 px images)",
        "",
        "| images | peak RSS, main process | largest worker |",
        "|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rng = np.random.default_rng(0)
        (folder / "img").mkdir()
        total = max(args.memory_sizes)
        for i in range(total):
            Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(folder / "img" / f"{i:06d}.png")
        for size in args.memory_sizes:
            csv = folder / f"n{size}.csv"
            csv.write_text("Path\n" + "".join(f"img/{i:06d}.png\n" for i in range(size)))
            store = folder / f"s{size}.h5"
            code = (
                "import resource\nfrom xsel.embed import embed\n"
                f"embed({str(csv)!r}, {str(store)!r}, encoder='pixels', image_size=32, show_progress=False)\n"
                "usage = resource.getrusage\n"
                "print(usage(resource.RUSAGE_SELF).ru_maxrss, usage(resource.RUSAGE_CHILDREN).ru_maxrss)"
            )
            output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            main, child = (int(v) / 1024 for v in output.split())
            lines.append(f"| {size:,} | {main:,.0f} MiB | {child:,.0f} MiB |")
    lines += ["", "Memory stays flat: blocks of 1,024 rows go to shard files, the store is written in chunks.", ""]


def selector_section(args, lines: list[str]) -> None:
    sizes = [1_000, 10_000, 100_000]
    lines += [
        "## 5. Selector time against pool size (K=20, 512-d, seconds)",
        "",
        "| selector | " + " | ".join(f"{n:,}" for n in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    cells: dict[str, list[str]] = {}
    for name, _, times, _ in time_selectors(sizes, 20, args.repeats):
        cells.setdefault(name, []).append(spread(times, 3))
    for name, values in cells.items():
        lines.append(f"| {name} | " + " | ".join(values) + " |")
    lines.append("")


def evaluate_section(args, lines: list[str]) -> None:
    from xsel.demo import generate_demo_data
    from xsel.embed import embed
    from xsel.evaluate import evaluate

    with tempfile.TemporaryDirectory() as tmp:
        csv = generate_demo_data(Path(tmp), n_images=600, image_size=64)
        embed(csv, Path(tmp) / "d.h5", encoder="pixels", show_progress=False)
        rates = []
        for repeat in range(args.repeats):
            began = time.perf_counter()
            evaluate(
                Path(tmp) / "d.h5",
                ["Cardiomegaly", "Edema"],
                episodes=10,
                pool_size=200,
                query_size=40,
                seed=repeat,
                show_progress=False,
            )
            rates.append(20 / (time.perf_counter() - began))
    lines += [
        "## 6. `xsel evaluate` throughput",
        "",
        f"Demo store (600 images, pixels 1024-d), pool 200, query 40, K=20, all six baselines per episode: "
        f"{spread(rates)} episodes/s.",
        "",
    ]


def zoo_section(args, lines: list[str]) -> None:
    """The field's encoders (torchxrayvision, timm, RAD-DINO; those installed), random weights, vs resnet18."""
    from bench_zoo_encoders import ENCODERS, measure, table_lines

    lines += ["## 7. Field encoders: torchxrayvision, timm, RAD-DINO (`bench/bench_zoo_encoders.py`)", ""]
    lines += table_lines(measure(48, 16, list(ENCODERS)))
    lines += [
        "",
        "Random weights (speed does not depend on them), each at its published input size and preprocessing, "
        "through `xsel embed`; resnet18 runs before and after, the ratio divides by their mean.",
        "",
    ]


def scan_section(args, lines: list[str]) -> None:
    """`xsel scan` files/s on 20,000 small DICOM files (tags only, page cache), one process and one per core."""
    from bench_scan import measure, summary_lines

    lines += ["## 8. `xsel scan` (DICOM tags only; `bench/bench_scan.py`)", ""]
    lines += [f"- {line}" for line in summary_lines(measure(20_000, 2))]
    lines += [
        "",
        "Files in the page cache: header parsing, not the disk (`--files 100000` for the issue's figure).",
        "",
    ]


def million_section(args, lines: list[str]) -> None:
    """`xsel select` on stores of 10⁵ and 10⁶ images: every selector at K=20 and K=1,000, seconds and peak memory."""
    import bench_million

    results: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for rows in args.million_sizes:
            for row in bench_million.run(rows, [20, 1000], list(bench_million.SELECTORS), Path(tmp), 300, results):
                print(bench_million.describe(row), flush=True)
    lines += [
        "## 14. Selecting from a million images (`bench/bench_million.py`)",
        "",
        "512-d seeded mixture embeddings, one image per patient; `xsel.selection.select` in a fresh process per "
        "measurement, as the CLI runs it: seconds of the selection (store read included), peak resident memory of "
        "the whole process (libraries included; torch alone is ~0.5 GiB) and its ratio to the embeddings' size. "
        "`random --exclude`: "
        "1,000 labelled images excluded from a store where every tenth patient has a second image.",
        "",
        *bench_million.markdown(results),
        "",
    ]


def int8_section(args, lines: list[str]) -> None:
    """int8 vs fp32 site encoders (`xsel export --quantize int8`): speed and agreement, 64 images."""
    from bench_int8 import HEURISTICS, measure

    from xsel import plugins

    lines += [
        "## 9. int8 site encoders (`bench/bench_int8.py`)",
        "",
        "| encoder | fp32 images/s | int8 images/s | speed-up | cosine min | K=20 picks unchanged "
        "(typiclust / kcenter / kmedoids / probcover) | typiclust picks shared by seeds 0 and 1–5 (fp32) |",
        "|---|---|---|---|---|---|---|",
    ]
    for encoder in ("resnet18", "efficientnet-lite0"):
        if encoder not in plugins.names("encoder"):
            continue
        result = measure(encoder, n_images=64, episodes=0)  # speed and agreement; AUROC needs more images
        rates, unchanged = result["images_per_s"], result["picks_unchanged"]
        lines.append(
            f"| {encoder} ({result['weights']}) | {rates['fp32']:.0f} | {rates['int8']:.0f} | {result['speedup']:.2f}× "
            f"| {result['cosine_min']:.4f} | {' / '.join(f'{unchanged[name]:.0%}' for name in HEURISTICS)} "
            f"| {result['seed_overlap']['typiclust']:.0%} |"
        )
    lines += [
        "",
        "`xsel export --quantize int8` writes a bundle only when ≥ 95% of the site's picks (the bundle's learned "
        "selector, else typiclust) are unchanged; `bench/bench_int8.py --selector NAME=CKPT` measures a bundle with "
        "its learned selector.",
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-sizes", type=lambda v: [int(x) for x in v.split(",")], default=[10_000, 100_000])
    parser.add_argument("--million-sizes", type=lambda v: [int(x) for x in v.split(",")], default=[100_000, 1_000_000])
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()

    import h5py
    import onnxruntime
    import ray
    import sklearn
    import torch

    from xsel import __version__

    with open("/proc/cpuinfo") as handle:
        cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "?")
    lines = [
        "# xsel benchmarks",
        "",
        f"Written by `python bench/run_all.py` on {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC.",
        f"Machine: {cpu}, {torch.get_num_threads()} threads, {platform.machine()}; Python {platform.python_version()}; "
        f"xsel {__version__}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, ray {ray.__version__}, "
        f"scikit-learn {sklearn.__version__}, h5py {h5py.__version__}.",
        "",
    ]
    sections = [
        embed_section,
        memory_section,
        selector_section,
        evaluate_section,
        zoo_section,
        scan_section,
        int8_section,
        million_section,
    ]
    for section in sections:
        began = time.perf_counter()
        section(args, lines)
        print(f"{section.__name__}: {time.perf_counter() - began:.0f} s", flush=True)
    if not torch.cuda.is_available():
        lines += [
            "## GPU",
            "",
            "No CUDA device on this machine: the CUDA paths (fp16 embedding, training on CUDA, onnxruntime's CUDA "
            "provider at a site) exist and fall back cleanly but are not measured here.",
        ]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
