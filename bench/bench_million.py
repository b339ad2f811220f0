"""Benchmark: `xsel select` on a million-image store, every selector at K=20 and K=1,000: seconds and peak memory.

The store holds ``--rows`` seeded 512-d embeddings (a mixture of 50 Gaussian clusters, as bench_selectors.py) with
one image per patient, so the pool is the whole store. Each measurement runs ``xsel.selection.select`` in a fresh
process as `xsel select` does (reading the store itself) and reports its seconds, store read included, and the
process's peak resident memory (VmHWM: numpy, BLAS and torch buffers included) as a multiple of the embeddings'
size. Learned selectors use checkpoints trained for a few steps on a small synthetic store (their cost does not
depend on how well they were trained); uncertainty and boostmis read a linear probe fitted on random labels. One
more row runs `random` with ``--exclude`` of 1,000 labelled images from a store where every tenth patient has a
second image, so the exclusion and the one-per-patient rule run on a pool that is not the whole store.

    python bench/bench_million.py [--rows 100000,1000000] [--ks 20,1000] [--cache DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

DIM = 512
CLUSTERS = 50
ATTRS = {"encoder": "synthetic-mixture", "weights_sha256": "none", "preprocessing": {}}
SELECTORS = (
    "random",
    "kcenter",
    "kmedoids",
    "typiclust",
    "probcover",
    "uncertainty",
    "boostmis",
    "medselect",
    "setselect",
)


def write_mixture_store(path: Path, rows: int, *, second_images: bool = False) -> None:
    """A store of ``rows`` seeded mixture embeddings, written chunk by chunk (memory stays flat)."""
    from xsel.store import write_store

    centres = np.random.default_rng(0).normal(size=(CLUSTERS, DIM))

    def chunks():
        for start in range(0, rows, 65_536):
            rng = np.random.default_rng([1, start])
            n = min(65_536, rows - start)
            yield (centres[rng.integers(0, CLUSTERS, n)] + 0.8 * rng.normal(size=(n, DIM))).astype(np.float32)

    patients = np.arange(rows)
    if second_images:  # every tenth patient has two images
        patients = np.arange(rows) - ((np.arange(rows) % 10) == 1)
    meta = pd.DataFrame({"PatientID": [f"P{p:07d}" for p in patients]})
    paths = [f"img/{i:07d}.png" for i in range(rows)]
    write_store(path, embedding_chunks=chunks(), paths=paths, meta=meta, attrs=ATTRS)


def learned_checkpoints(cache: Path) -> dict[str, Path]:
    """Tiny trained checkpoints of both learned selectors on a synthetic labelled 512-d store (a few steps each)."""
    from xsel.store import Store
    from xsel.train.medselect import SelectorConfig
    from xsel.train.selector import train_selector

    found = {name: cache / name / "selector.pt" for name in ("medselect", "setselect")}
    if all(path.exists() for path in found.values()):
        return found
    rng = np.random.default_rng(0)
    n = 3_000
    embeddings = rng.normal(size=(n, DIM)).astype(np.float32)
    labels = {f"C{c}": (rng.random(n) < 0.3).astype(float) for c in range(6)}
    labels["No Finding"] = (sum(labels.values()) == 0).astype(float)
    meta = pd.DataFrame({"PatientID": [f"P{i}" for i in range(n)], **labels})
    store = Store(Path("synthetic.h5"), embeddings, [f"img/{i}.png" for i in range(n)], meta, dict(ATTRS))
    for name, model in (("medselect", "lstm"), ("setselect", "set")):
        config = SelectorConfig(
            conditions=["C0", "C1", "C2", "C3"],
            val_conditions=["C4", "C5"],
            model=model,
            pool_size=100,
            query_size=40,
            episodes=48,
            val_every=3,
            val_episodes=2,
        )
        train_selector(store, cache / name, config, show_progress=False)
    return found


def probe(cache: Path) -> Path:
    """A linear classifier on random labels of 1,000 mixture rows, saved as ``classifier.pt`` (uncertainty/boostmis)."""
    path = cache / "probe" / "classifier.pt"
    if path.exists():
        return path
    from xsel.identity import identity_of
    from xsel.train.head import fit_linear_head, save_classifier

    rng = np.random.default_rng(0)
    sample = rng.normal(size=(1_000, DIM)).astype(np.float32)
    head = fit_linear_head(sample, rng.integers(0, 2, (1_000, 1)).astype(np.float32), epochs=20)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_classifier(
        path, head=head, labels=["label"], encoder_identity=identity_of(ATTRS), thresholds=[0.5], config={}
    )


def peak_resident_bytes() -> int:
    """This process's peak resident memory (VmHWM). Not ``ru_maxrss``: Linux carries that over from the parent
    through fork and exec, so a child would report at least its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def child(store: str, selector: str, k: int, option: str | None, exclude: str | None) -> None:
    """One measurement in this fresh process, as `xsel select` runs it (the store read by select itself): print JSON
    with the seconds and the peak resident memory."""
    import h5py

    from xsel.selection import select

    options = {}
    if option:
        key, value = option.split("=", 1)
        options[key] = value
    began = time.perf_counter()
    # the learned selectors' own cost: their trust gate would hand this synthetic pool to a heuristic
    selection = select(store, k, selector=selector, exclude=exclude, seed=0, trust_gate=False, **options)
    seconds = time.perf_counter() - began
    with h5py.File(store, "r") as handle:
        embeddings_bytes = handle["embeddings"].size * 4
    result = {"seconds": seconds, "peak_bytes": peak_resident_bytes(), "embeddings_bytes": embeddings_bytes}
    print(json.dumps(result | {"picked": len(selection.table), "pool": selection.pool_size}))


def measure(store: Path, selector: str, k: int, option: str | None, exclude: Path | None, timeout: float) -> dict:
    command = [sys.executable, __file__, "--child", str(store), selector, str(k), option or "", str(exclude or "")]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"stopped after {timeout:.0f} s"}
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(rows: int, ks: list[int], selectors: list[str], cache: Path, timeout: float, results: list[dict]):
    """Measure every (selector, K) not in ``results`` yet on a ``rows``-image store (made once in ``cache``), plus
    ``random --exclude``; append each row to ``results`` as it is measured and yield it."""
    cache.mkdir(parents=True, exist_ok=True)
    store = cache / f"mixture-{rows}.h5"
    if not store.exists():
        write_mixture_store(store, rows)
    options = {}
    if {"medselect", "setselect"} & set(selectors):
        options |= {name: f"checkpoint={path}" for name, path in learned_checkpoints(cache).items()}
    if {"uncertainty", "boostmis"} & set(selectors):
        options |= {name: f"model={probe(cache)}" for name in ("uncertainty", "boostmis")}
    done = {(r["selector"], r["rows"], r["k"]) for r in results}
    for name, k, variant in [(name, k, None) for name in selectors for k in ks] + [("random", 20, "exclude")]:
        label = name if variant is None else f"{name} --exclude"
        if (label, rows, k) in done:
            continue
        target, exclude = store, None
        if variant == "exclude":
            target = cache / f"mixture-{rows}-patients.h5"
            if not target.exists():
                write_mixture_store(target, rows, second_images=True)
            exclude = cache / "labelled.csv"
            labelled = [f"img/{i:07d}.png" for i in range(0, rows, max(1, rows // 1000))]
            pd.DataFrame({"Path": labelled}).to_csv(exclude, index=False)
        row = {"selector": label, "rows": rows, "k": k, **measure(target, name, k, options.get(name), exclude, timeout)}
        results.append(row)
        yield row


def describe(row: dict) -> str:
    """One line of the console log."""
    head = f"{row['selector']:18s} N={row['rows']:>9,} K={row['k']:<5d}"
    if "error" in row:
        return f"{head} failed: {row['error']}"
    ratio = row["peak_bytes"] / row["embeddings_bytes"]
    return f"{head} {row['seconds']:7.1f} s  peak {row['peak_bytes'] / 2**20:7,.0f} MiB ({ratio:.2f}× the embeddings)"


def markdown(results: list[dict]) -> list[str]:
    """The table BENCHMARKS.md shows: per selector and K, seconds and peak memory at each store size."""
    sizes = sorted({r["rows"] for r in results})
    lines = [
        "| selector | K | " + " | ".join(f"{n:,}: seconds, peak MiB (× embeddings)" for n in sizes) + " |",
        "|---|---|" + "---|" * len(sizes),
    ]
    keyed = {(r["selector"], r["k"], r["rows"]): r for r in results}
    for selector, k in dict.fromkeys((r["selector"], r["k"]) for r in results):
        cells = []
        for n in sizes:
            row = keyed.get((selector, k, n))
            if row is None:
                cells.append("—")
            elif "error" in row:
                cells.append(row["error"])
            else:
                mib = row["peak_bytes"] / 2**20
                cells.append(
                    f"{row['seconds']:.1f} s, {mib:,.0f} MiB ({row['peak_bytes'] / row['embeddings_bytes']:.2f}×)"
                )
        lines.append(f"| {selector} | {k:,} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _, _, store, selector, k, option, exclude = sys.argv
        child(store, selector, int(k), option or None, exclude or None)
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1000000", help="Store sizes, comma-separated.")
    parser.add_argument("--ks", default="20,1000")
    parser.add_argument("--selectors", default=",".join(SELECTORS))
    parser.add_argument("--cache", type=Path, default=Path("bench/results/stores/million"))
    parser.add_argument("--timeout", type=float, default=300, help="Seconds after which a measurement is stopped.")
    parser.add_argument("--json", type=Path, help="Also write the results here (results already there are kept).")
    args = parser.parse_args()
    results = json.loads(args.json.read_text())["results"] if args.json and args.json.exists() else []
    for rows in (int(n) for n in args.rows.split(",")):
        ks = [int(k) for k in args.ks.split(",")]
        for row in run(rows, ks, args.selectors.split(","), args.cache, args.timeout, results):
            print(describe(row), flush=True)
            if args.json:
                args.json.write_text(json.dumps({"benchmark": "million", "results": results}, indent=2))
    print("\n".join(markdown(results)))


if __name__ == "__main__":
    main()
