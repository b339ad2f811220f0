"""Benchmark: selection time and peak memory of every built-in selector at pool sizes 1k / 10k / 100k.

Embeddings are a seeded mixture of 50 Gaussian clusters in 512 dimensions (closer to real encoders
than i.i.d. noise). Time is the selector call alone (start-up and data generation excluded), the
median of ``--repeats`` runs with min/max; peak memory is what tracemalloc sees allocated during
the call (numpy and Python objects; native BLAS/OpenMP buffers are not counted).

    python bench/bench_selectors.py [--sizes 1000,10000,100000] [--k 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
from benchlib import timing_selector

from xsel import plugins
from xsel.selectors import run_selector


def mixture(n: int, dim: int = 512, clusters: int = 50, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    return (centres[rng.integers(0, clusters, n)] + 0.8 * rng.normal(size=(n, dim))).astype(np.float32)


def time_selectors(sizes: list[int], k: int, repeats: int, *, trace_memory: bool = False):
    """Yield (selector, pool size, seconds per run, traced peak bytes per run) for every timeable selector.

    Each selector is warmed up on 200 rows first (imports, compilation); only the selection call is timed.
    """
    for n in sizes:
        embeddings = mixture(n)
        metadata = pd.DataFrame({"label": np.random.default_rng(1).integers(0, 2, n)})
        for name in plugins.names("selector"):
            selector = timing_selector(name, embeddings)
            if selector is None:
                continue
            run_selector(selector, name, embeddings[:200], k, seed=0, metadata=metadata[:200])
            times, peaks = [], []
            for repeat in range(repeats):
                if trace_memory:
                    tracemalloc.start()
                began = time.perf_counter()
                run_selector(selector, name, embeddings, k, seed=repeat, metadata=metadata)
                times.append(time.perf_counter() - began)
                if trace_memory:
                    peaks.append(tracemalloc.get_traced_memory()[1])
                    tracemalloc.stop()
            yield name, n, times, peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    args = parser.parse_args()

    results = []
    sizes = [int(s) for s in args.sizes.split(",")]
    for name, n, times, peaks in time_selectors(sizes, args.k, args.repeats, trace_memory=True):
        row = {
            "selector": name,
            "pool": n,
            "seconds_median": statistics.median(times),
            "seconds_min": min(times),
            "seconds_max": max(times),
            "peak_mib": max(peaks) / 2**20,
            "embeddings_mib": n * 512 * 4 / 2**20,
        }
        results.append(row)
        print(
            f"{name:16s} N={n:>7,}  {row['seconds_median']:8.3f} s (min {row['seconds_min']:.3f}, "
            f"max {row['seconds_max']:.3f})  peak {row['peak_mib']:7.1f} MiB "
            f"(embeddings {row['embeddings_mib']:.0f} MiB)",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps({"benchmark": "selectors", "k": args.k, "results": results}, indent=2))


if __name__ == "__main__":
    main()
