"""``xsel demo``: the whole pipeline on built-in synthetic chest images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from xsel.cli import app
from xsel.cli.evaluate import print_summary


@app.command("demo")
def demo_command(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the demo's images, CSV and store.")] = Path(
        "demo-output"
    ),
    encoder: Annotated[str, typer.Option(help="Encoder plugin used for the embeddings.")] = "pixels",
    weights: Annotated[str | None, typer.Option(help="Weights for the encoder (see `xsel embed --help`).")] = None,
    images: Annotated[int, typer.Option(help="How many synthetic images to generate.")] = 600,
    episodes: Annotated[int, typer.Option(help="Evaluation episodes per condition.")] = 20,
    train_minutes: Annotated[float, typer.Option(help="Time budget for training the learned selector.")] = 1.0,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the synthetic data.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Run the whole pipeline on synthetic chest X-rays: embed, train a selector, evaluate, export, select.

    [bold]Examples[/bold]

      xsel demo
      xsel demo --out /tmp/xsel-demo --encoder efficientnet-lite0 --images 1000
    """
    from xsel.demo import CONDITIONS, NEGATIVE, SEEN, UNSEEN, VALIDATION, run_demo
    from xsel.io.outputs import claim_output

    ctx.with_resource(claim_output(out, kind="folder"))  # the demo empties it only when an earlier demo made it
    result = run_demo(
        out,
        encoder=encoder,
        weights=weights,
        n_images=images,
        episodes=episodes,
        train_minutes=train_minutes,
        seed=seed,
        show_progress=not quiet,
    )
    labels = result.labels
    table = Table(title=f"xsel demo: {len(labels)} synthetic images, {labels['PatientID'].nunique()} patients")
    for column in ("label", "positive (1)", "uncertain (-1)", "negative (0)", "blank"):
        table.add_column(column, justify="right" if column != "label" else "left")
    for condition in (*CONDITIONS, NEGATIVE):
        values = labels[condition]
        table.add_row(
            condition,
            str(int((values == 1).sum())),
            str(int((values == -1).sum())),
            str(int((values == 0).sum())),
            str(int(values.isna().sum())),
        )
    console = Console()
    console.print(table)
    embedded = result.embed
    console.print(
        f"Embeddings: {embedded.embedded} × {embedded.embedding_dim} ({embedded.encoder}) in "
        f"{embedded.seconds:.1f} s, {embedded.images_per_second:.1f} images/s → {result.store}",
        soft_wrap=True,
    )
    trained = result.training
    console.print(
        f"Learned selector: {trained.steps} steps ({trained.episodes} episodes) on {', '.join(SEEN)} in "
        f"{trained.seconds:.0f} s; validation AUROC on {', '.join(VALIDATION)} {trained.best_val_auroc:.3f} "
        f"(random picks {trained.random_val_auroc:.3f})",
        soft_wrap=True,
    )
    console.print(f"[bold]Unseen conditions ({', '.join(UNSEEN)}):[/bold]")
    print_summary(result.evaluation, console)
    picked = result.selection.table
    agreement = "the same images as" if result.site_matches_workstation else "[red]different images from[/red]"
    console.print(
        f"Bundle {result.bundle} (ONNX, no PyTorch needed) picked {len(picked)} of {result.selection.pool_size} "
        f"images to label → {result.out_dir / 'selection.csv'}; {agreement} the workstation's selection.",
        soft_wrap=True,
    )
    site = result.site
    left_out = ", ".join(f"{count} {reason}" for reason, count in site.scan.left_out_counts.items()) or "none"
    record = site.selection.record
    views = ", ".join(f"{stratum['stratum']} {stratum['picked']}" for stratum in record.get("strata", []))
    console.print(
        f"Hospital site: scanned {site.scan.files_seen} files of the DICOM archive {site.archive} → "
        f"{len(site.scan.table)} chest frontal images (left out: {left_out}); one image per study, "
        f"{len(record.get('duplicate_groups', []))} near-duplicate groups merged, views balanced "
        f"({views}) → {site.selection_csv}",
        soft_wrap=True,
        markup=False,
    )
    verdict = "verified" if site.verified.ok else f"NOT verified: {site.verified.differences[0]}"
    console.print(
        f"Certificate {site.certificate} ({verdict}); report {site.report}; labelling: {site.label_studio} "
        f"(Label Studio tasks), {site.cvat} (CVAT manifest)",
        soft_wrap=True,
        markup=False,
    )
    console.print(
        f"Images and labels: {result.csv}; evaluation: {result.out_dir / 'evaluation'}", soft_wrap=True, markup=False
    )
