"""``xsel select``: pick the K images to label from a store's pool."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from xsel.cli import app
from xsel.cli.options import Device
from xsel.progress import notify


@app.command("select")
def select_command(
    ctx: typer.Context,
    source: Annotated[
        Path | None,
        typer.Argument(
            metavar="STORE_OR_CSV",
            help="Embedding store (from `xsel embed`); with --bundle, the image CSV or a folder of images.",
        ),
    ] = None,
    k: Annotated[int | None, typer.Option("--k", "-k", help="How many images to label.")] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Selection CSV to write (rank, Path, score, selector, reason, …) and its certificate."
        ),
    ] = None,
    selector: Annotated[
        str | None,
        typer.Option(
            help="Selector plugin (default: medselect with --checkpoint, uncertainty with --model, else typiclust)."
        ),
    ] = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(help="A learned selector's checkpoint (RUN_DIR/selector.pt from `xsel train selector`)."),
    ] = None,
    model: Annotated[
        Path | None,
        typer.Option(
            help="A classifier (RUN_DIR/classifier.pt or RUN_DIR from `xsel train classifier`) for the next round "
            "of active learning: the uncertainty (default with --model) and boostmis selectors read it."
        ),
    ] = None,
    label: Annotated[
        str | None,
        typer.Option(help="With --model: score only this label of the classifier (default: all of its labels)."),
    ] = None,
    exclude: Annotated[
        Path | None,
        typer.Option(help="CSV whose Path column lists images already labelled (e.g. an earlier selection)."),
    ] = None,
    seed: Annotated[
        int, typer.Option(min=0, help="Seed for every random choice; the same seed gives the same selection.")
    ] = 0,
    allow_same_patient: Annotated[
        bool, typer.Option(help="Allow several images of one PatientID (default: first image per patient).")
    ] = False,
    one_per: Annotated[
        str | None,
        typer.Option(help="Keep one image per patient (default), per study (StudyInstanceUID) or every image."),
    ] = None,
    dedup: Annotated[
        float | None,
        typer.Option(
            help="Leave out near-duplicates: images whose embeddings' cosine similarity reaches this (e.g. 0.995; "
            "exact copies always do); each group keeps its first image, the certificate lists the groups."
        ),
    ] = None,
    balance: Annotated[
        str | None,
        typer.Option(help="Equal shares of K per value of these columns, e.g. View,Sex (AgeBand: from Age)."),
    ] = None,
    quota: Annotated[
        str | None,
        typer.Option(
            help='Shares of K for values of one column, e.g. "View=PA:0.7" (the other values share the rest).'
        ),
    ] = None,
    report: Annotated[
        Path | None,
        typer.Option(help="Also write a self-contained HTML report: thumbnails with reasons, a pool map, coverage."),
    ] = None,
    verify: Annotated[
        Path | None,
        typer.Option(
            help="Recompute the selection a SELECTION.json certificate describes and confirm it (exit 1 if not)."
        ),
    ] = None,
    trust_gate: Annotated[
        bool,
        typer.Option(
            "--trust-gate/--no-trust-gate",
            help="A learned selector with a trust gate hands a pool unlike its training pools to the heuristic that "
            "validated best, with a warning and a record in the certificate; --no-trust-gate always runs the learned "
            "selector.",
        ),
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the selection as JSON records on stdout.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing selection CSV (one xsel wrote).")] = False,
    bundle: Annotated[
        Path | None,
        typer.Option(help="Site mode: an exported bundle folder; encodes the CSV's images with onnxruntime."),
    ] = None,
    store: Annotated[
        Path | None, typer.Option(help="Site mode: keep (or reuse) the computed embeddings in this store.")
    ] = None,
    device: Annotated[Device, typer.Option(help="Site mode: where onnxruntime runs.")] = Device.auto,
    image_root: Annotated[
        Path | None,
        typer.Option(
            help="Folder the Path values are relative to: the site's images, or the --report thumbnails' (default: "
            "the CSV's folder at a site, the store's folder otherwise)."
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Site mode: images per encoder call.")] = 32,
    workers: Annotated[int | None, typer.Option(help="Site mode: decode worker processes.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Choose K images to label from the pool and write them, best first, to a CSV.

    Workstation: STORE is an embedding store. Hospital site: with [bold]--bundle[/bold], the argument is the
    CSV of images; they are encoded by the bundle's ONNX encoder (no PyTorch needed) and ranked by its
    learned selector, or by --selector.

    [bold]Examples[/bold]

      xsel select pool.h5 --k 20 --out to_label.csv
      xsel select pool.h5 --k 20 --out round2.csv --selector kcenter --exclude to_label.csv
      xsel select pool.h5 --k 50 --out picks.csv --selector probcover --seed 7 --json | jq '.[0]'
      xsel select pool.h5 --k 20 --out picks.csv --checkpoint runs/sel/selector.pt
      xsel select pool.h5 --k 20 --out round2.csv --selector boostmis --model runs/clf/classifier.pt --exclude r1.csv
      xsel select pool.h5 --k 20 --out round2.csv --selector uncertainty --model runs/clf --label Edema
      xsel select images.csv --bundle exports/cxr --k 20 --out to_label.csv --store site.h5
      xsel select dicoms/ --bundle exports/cxr --k 20 --out to_label.csv --dedup 0.995 --balance View --report r.html
      xsel select --verify to_label.SELECTION.json
    """
    from xsel.certificate import write_certificate
    from xsel.errors import InputError
    from xsel.io.outputs import claim_output
    from xsel.io.table import write_csv_atomic
    from xsel.selection import SELECTION_COLUMNS

    if verify is not None:
        _verify(verify, quiet)
        return
    missing = [name for name, value in (("STORE_OR_CSV", source), ("--k", k), ("--out", out)) if value is None]
    if missing:
        raise InputError(f"missing {', '.join(missing)}; see `xsel select --help`")
    _check_mode(bundle, store, checkpoint, model, label)
    constraints = _constraints(one_per, allow_same_patient, dedup, balance, quota)
    inputs = [source if source.is_file() else None, exclude, checkpoint, model, bundle]  # a folder may hold picks
    header = SELECTION_COLUMNS[:4]  # rank, Path, score, selector: selections written before `reason` qualify too
    ctx.with_resource(claim_output(out, kind="csv", header=header, inputs=inputs, overwrite=overwrite))
    if report is not None:
        ctx.with_resource(claim_output(report, kind="html", option="--report", inputs=inputs, overwrite=overwrite))
    options = {
        "selector": selector,
        "seed": seed,
        "exclude": exclude,
        "constraints": constraints,
        "trust_gate": trust_gate,
    }
    if bundle is not None:
        from xsel.site import site_select

        selection = site_select(
            source, bundle, k, out=out, device=device.value, store=store, image_root=image_root,
            batch_size=batch_size, workers=workers, show_progress=not quiet, **options,
        )  # fmt: skip
    else:
        from xsel.selection import select

        selection = select(source, k, checkpoint=checkpoint, model=model, label=label, **options)
    for warning in selection.warnings:
        notify(warning)
    write_csv_atomic(selection.table, out)
    certificate = write_certificate(selection, out)
    if report is not None:
        from xsel.report import write_selection_report

        root = image_root or (source if source.is_dir() else source.parent)
        write_selection_report(report, selection.table, selection.store, pool_rows=selection.pool, image_root=root)
    notify(f"certificate → {certificate}" + (f", report → {report}" if report is not None else ""), label="note")
    if as_json:
        typer.echo(selection.table.to_json(orient="records", indent=2))
    else:
        _show(selection, out)


def _check_mode(bundle, store, checkpoint, model, label) -> None:
    """Options that belong to one mode only (site with --bundle, or a store) are usage errors in the other."""
    from xsel.errors import InputError

    if bundle is None and store is not None:
        raise InputError("--store applies to site mode only: add --bundle DIR (the argument is then a CSV)")
    if bundle is not None and checkpoint is not None:
        raise InputError("--checkpoint and --bundle exclude each other: a bundle carries its own learned selector")
    if bundle is not None and (model is not None or label is not None):
        raise InputError(
            "--model and --label apply to a store, not to --bundle: embed the images and select from the store"
        )


def _constraints(one_per, allow_same_patient: bool, dedup, balance, quota):
    from xsel.constraints import Constraints, parse_quotas
    from xsel.errors import InputError

    if allow_same_patient and one_per not in (None, "image"):
        raise InputError(f"--allow-same-patient and --one-per {one_per} contradict each other; keep one")
    return Constraints(
        one_per=one_per or ("image" if allow_same_patient else "patient"),
        dedup=dedup,
        balance=tuple(column.strip() for column in (balance or "").split(",") if column.strip()),
        quotas=parse_quotas(quota),
    )


def _show(selection, out: Path) -> None:
    """The first 25 picks as a table on stdout."""
    table = selection.table
    name = table["selector"].iloc[0]
    view = Table(title=f"{len(table)} of {selection.pool_size} images selected with {name} → {out}")
    shown = ["rank", "Path", *[c for c in ("PatientID", "View", "Sex", "Age") if c in table.columns]]
    for column in shown:
        view.add_column(column, overflow="fold")
    for _, row in table.head(25).iterrows():
        view.add_row(*["" if row[c] != row[c] else str(row[c]) for c in shown])
    Console().print(view)
    if len(table) > 25:
        typer.echo(f"… and {len(table) - 25} more in {out}")


def _verify(certificate: Path, quiet: bool) -> None:
    from xsel.certificate import verify

    result = verify(certificate, show_progress=not quiet)
    if not result.ok:
        notify(f"{certificate}: NOT reproduced: {result.differences[0]}", label="error", style="bold red")
        raise typer.Exit(1)
    typer.echo(f"{certificate}: verified — the inputs are unchanged and all {result.picks} picks were reproduced")
