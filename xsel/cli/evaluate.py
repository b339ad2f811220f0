"""``xsel evaluate``: compare selectors over paired labeling episodes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from xsel.cli import app
from xsel.cli.options import split_list
from xsel.errors import InputError
from xsel.progress import notify


def parse_budgets(value: str) -> list[int]:
    try:
        return [int(item) for item in split_list(value, "--k")]
    except ValueError:
        raise InputError(f"--k {value}: give whole numbers, e.g. --k 20 or --k 10,20,40") from None


def _style(row) -> str:
    return "green" if row["diff_low"] > 0 else "red" if row["diff_high"] < 0 else "default"


def _given(**options) -> dict:
    """The options set on the command line; the rest keep the library's defaults (which differ with --rounds)."""
    return {name: value for name, value in options.items() if value is not None}


def print_rounds(result, console: Console) -> None:
    """Active learning: per strategy, mean AUROC after each round (columns: labelled images) and, below it,
    the paired Δ to random with its 95% CI, green/red where the CI is above/below 0."""
    from xsel.evaluate import OVERALL, REFERENCE

    settings = result.settings
    summary = result.summary[result.summary["condition"] == OVERALL]
    view = Table(
        title=f"Active learning: query AUROC of the linear probe over {len(settings['conditions'])} conditions × "
        f"{settings['episodes_per_condition']} episodes (cold start {settings['cold_start']}, then "
        f"{settings['rounds']} rounds of {settings['k']})"
    )
    view.add_column("strategy", no_wrap=True)
    for labelled in settings["labelled"]:
        view.add_column(f"{labelled} labels", justify="right")
    for strategy in settings["strategies"]:
        cells = []
        for labelled in settings["labelled"]:
            row = summary[(summary["strategy"] == strategy) & (summary["labelled"] == labelled)].iloc[0]
            cell = f"{row['auroc']:.3f} [{row['auroc_low']:.3f}, {row['auroc_high']:.3f}]"
            if strategy != REFERENCE and row["round"] > 0:
                style = _style(row)
                cell += (
                    f"\n[{style}]Δ {row['diff_vs_random']:+.3f} [{row['diff_low']:+.3f}, {row['diff_high']:+.3f}]"
                    f"[/{style}]"
                )
            cells.append(cell)
        view.add_row(strategy, *cells)
    console.print(view)


def _score_cells(row, selector: str, prefix: str = "") -> list[str]:
    """Mean [CI] and the paired Δ to random [CI] of one score (``prefix`` "probe_" for the archive probe)."""
    from xsel.evaluate import REFERENCE

    diff = "—"
    if selector != REFERENCE:
        style = _style({name: row[f"{prefix}{name}"] for name in ("diff_low", "diff_high")})
        diff = (
            f"[{style}]{row[f'{prefix}diff_vs_random']:+.3f} "
            f"[{row[f'{prefix}diff_low']:+.3f}, {row[f'{prefix}diff_high']:+.3f}][/{style}]"
        )
    mean = f"{row[f'{prefix}auroc']:.3f} [{row[f'{prefix}auroc_low']:.3f}, {row[f'{prefix}auroc_high']:.3f}]"
    return [mean, diff]


def print_summary(result, console: Console) -> None:
    """Per K: an overall table (mean AUROC, 95% CI, paired Δ to random, win rate) and a per-condition
    table of means, green where the Δ's CI is above 0 and red where it is below. Archive evaluations
    add the probe's columns and list the conditions scored instead of a per-condition table."""
    from xsel.episodes import ARCHIVE
    from xsel.evaluate import OVERALL, REFERENCE

    summary = result.summary
    settings = result.settings
    archive = settings.get("protocol") == ARCHIVE
    for budget in settings["k"]:
        rows = summary[summary["k"] == budget]
        overall = rows[rows["condition"] == OVERALL].set_index("selector")
        scope = f"{len(settings['conditions'])} conditions {'in' if archive else '×'} "
        scope += f"{settings['episodes_per_condition']} {'archive ' if archive else ''}episodes"
        view = Table(title=f"K={budget}: query AUROC over {scope} ({settings['classifier']} classifier)")
        columns = ["selector", "AUROC [95% CI]", "Δ vs random [95% CI]", "wins"]
        if archive:
            columns += ["probe AUROC [95% CI]", "probe Δ vs random [95% CI]"]
        for column in columns:
            view.add_column(column, justify="left" if column == "selector" else "right", no_wrap=True)
        for selector in settings["selectors"]:
            row = overall.loc[selector]
            mean, diff = _score_cells(row, selector)
            cells = [selector, mean, diff, "—" if selector == REFERENCE else f"{row['win_rate']:.0%}"]
            view.add_row(*cells, *(_score_cells(row, selector, "probe_") if archive else []))
        console.print(view)
        if archive:
            console.print(f"Conditions labelled: {', '.join(settings['conditions'])}", soft_wrap=True, markup=False)
        elif len(settings["conditions"]) > 1:
            per_condition = Table(
                title=f"K={budget}: mean AUROC per condition (green/red: Δ vs random CI above/below 0)"
            )
            per_condition.add_column("selector", no_wrap=True)
            for condition in settings["conditions"]:
                per_condition.add_column(condition, justify="right")
            for selector in settings["selectors"]:
                cells = []
                for condition in settings["conditions"]:
                    row = rows[(rows["condition"] == condition) & (rows["selector"] == selector)].iloc[0]
                    style = _style(row)
                    cells.append(f"[{style}]{row['auroc']:.3f}[/{style}]")
                per_condition.add_row(selector, *cells)
            console.print(per_condition)


@app.command("evaluate")
def evaluate_command(
    ctx: typer.Context,
    store: Annotated[Path, typer.Argument(help="Embedding store with label columns.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for episodes.csv, summary.csv/json and plots.")],
    conditions: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated label columns to build episodes for; with --protocol archive, the ones to score "
            "(default: every label column with 2 positives and 2 negatives)."
        ),
    ] = None,
    selectors: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated selectors, NAME=CHECKPOINT for learned ones (NAME=classifier.pt for uncertainty "
            "and boostmis); random is always added. Default: random,kmedoids,kcenter,typiclust,probcover,"
            "oracle-balanced; with --rounds: random,typiclust,uncertainty,boostmis."
        ),
    ] = None,
    k: Annotated[
        str,
        typer.Option(
            "--k", "-k", help="Labels per episode; several (10,20,40) draw a curve. With --rounds: labels per round."
        ),
    ] = "20",
    protocol: Annotated[
        str,
        typer.Option(
            help="conditions: episodes per condition, its positives against --negative; archive: query and pool "
            "drawn from the whole store, the picks labelled for every condition, mean query AUROC over them."
        ),
    ] = "conditions",
    rounds: Annotated[
        int,
        typer.Option(
            min=0,
            help="Simulate active learning: a shared cold start of K (--cold-start), then this many rounds of K "
            "more per selector, a linear probe's query AUROC after each; uncertainty and boostmis read that probe.",
        ),
    ] = 0,
    cold_start: Annotated[
        str | None, typer.Option(help="With --rounds: the selector of round 0, shared by all (default typiclust).")
    ] = None,
    probe_epochs: Annotated[
        int | None, typer.Option(min=1, help="With --rounds: full-batch AdamW steps of each linear-probe fit (50).")
    ] = None,
    episodes: Annotated[
        int | None,
        typer.Option(help="Episodes per condition (default 200; 50 with --rounds); in all with --protocol archive."),
    ] = None,
    pool_size: Annotated[int, typer.Option(help="Images in each episode's pool.")] = 1000,
    query_size: Annotated[
        int, typer.Option(help="Images in each episode's query set (half of each class; archive: a random draw).")
    ] = 100,
    classifier: Annotated[
        str | None,
        typer.Option(
            help="Few-shot classifier scoring the query: cosine (default), prototype, knn, logistic; --rounds uses a "
            "linear probe instead."
        ),
    ] = None,
    negative: Annotated[
        str, typer.Option(help="Label column of the negative class (conditions protocol).")
    ] = "No Finding",
    uncertain: Annotated[
        str, typer.Option(help="Uncertain labels (-1) count as: positive, negative or ignore.")
    ] = "positive",
    seed: Annotated[int, typer.Option(min=0, help="Seed of the episodes and selectors.")] = 0,
    allow_same_patient: Annotated[bool, typer.Option(help="Allow several images of one PatientID.")] = False,
    episodes_within: Annotated[
        str | None,
        typer.Option(
            help="Column naming each image's hospital (e.g. Source, or Institution from xsel scan): a condition's "
            "episodes draw only from the hospitals with positives for it, not from every hospital's normals (a "
            "store of several hospitals)."
        ),
    ] = None,
    trust_gate: Annotated[
        bool | None,
        typer.Option(
            "--trust-gate/--no-trust-gate",
            help="A learned selector with a trust gate hands each pool unlike its training pools to its fallback "
            "heuristic, as `xsel select` does; episodes.csv marks them (fell_back) and a warning counts them "
            "(default on; --no-trust-gate always runs the learned selector).",
        ),
    ] = None,
    report: Annotated[
        Path | None,
        typer.Option(help="Also write a self-contained HTML report (settings, AUROC charts with CIs, Δ vs random)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print summary.json on stdout instead of a table.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Compare selectors: the query AUROC a classifier reaches with each selector's K labels, over
    many episodes that every selector shares (paired), with 95% bootstrap CIs.

    [bold]Examples[/bold]

      xsel evaluate pool.h5 --conditions Atelectasis,Edema --out results/ --report results/report.html
      xsel evaluate pool.h5 --conditions Effusion --k 10,20,40 --selectors typiclust,kcenter --out curve/
      xsel evaluate pool.h5 --conditions Edema --episodes 50 --pool-size 300 --query-size 60 --out quick/
      xsel evaluate pool.h5 --conditions Edema --selectors typiclust,medselect=runs/sel/selector.pt --out vs/
      xsel evaluate pool.h5 --conditions Effusion,Edema --rounds 3 --k 20 --pool-size 300 --out al/
      xsel evaluate pool.h5 --protocol archive --selectors typiclust,kcenter --out archive/
      xsel evaluate hospitals.h5 --conditions COVID-19,Effusion --episodes-within Source --out by-hospital/

    With [bold]--rounds R[/bold] the folder gets rounds.csv (episode, condition, strategy, round, labelled,
    auroc, …), rounds_summary.csv/json (paired Δ vs random per labelled count) and rounds.png.

    With [bold]--protocol archive[/bold] each episode's rows (condition "archive") add probe_auroc (a logistic
    regression per condition) and conditions_scored; the summary adds probe_* columns.
    """
    from xsel.io.outputs import claim_output

    checkpoints = [spec.partition("=")[2].strip() or None for spec in (selectors or "").split(",")]
    ctx.with_resource(claim_output(out, kind="folder", inputs=[store, *checkpoints]))  # before any episode runs
    if report is not None:
        # like the files of --out, a report xsel wrote before is replaced; anything else is refused
        ctx.with_resource(
            claim_output(report, kind="html", option="--report", inputs=[store, *checkpoints], overwrite=True)
        )
    shared = {  # what an evaluation and an active-learning simulation take alike
        "pool_size": pool_size,
        "query_size": query_size,
        "negative": negative,
        "uncertain": uncertain,
        "seed": seed,
        "allow_same_patient": allow_same_patient,
        "show_progress": not quiet,
        **_given(episodes=episodes, selectors=split_list(selectors, "--selectors") if selectors is not None else None),
    }
    if rounds:
        if protocol != "conditions":
            raise InputError(f"--rounds simulates condition episodes; --protocol {protocol} does not apply")
        if conditions is None:
            raise InputError("--rounds needs --conditions, the label columns to build episodes for")
        if report is not None:
            raise InputError(
                "--report covers selector comparisons; with --rounds read rounds_summary.csv and rounds.png"
            )
        if classifier is not None:
            raise InputError("--classifier applies without --rounds; --rounds scores the query with a linear probe")
        if trust_gate is not None or episodes_within is not None:
            option = "--trust-gate" if trust_gate is not None else "--episodes-within"
            raise InputError(f"{option} applies to selector comparisons, not to --rounds")
        if len(parse_budgets(k)) > 1:
            raise InputError(f"--k {k}: with --rounds give one K, the labels added per round")
        from xsel.train.active_learning import simulate, write_rounds_report

        result = simulate(
            store,
            split_list(conditions, "--conditions"),
            rounds=rounds,
            k=parse_budgets(k)[0],
            **shared,
            **_given(cold_start=cold_start, probe_epochs=probe_epochs),
        )
        write, show = write_rounds_report, print_rounds
    else:
        if cold_start is not None or probe_epochs is not None:
            raise InputError("--cold-start and --probe-epochs shape active-learning rounds; add --rounds R")
        from xsel.evaluate import evaluate, write_report

        result = evaluate(
            store,
            split_list(conditions, "--conditions") if conditions is not None else None,
            protocol=protocol,
            k=parse_budgets(k),
            **shared,
            **_given(classifier=classifier, trust_gate=trust_gate, episodes_within=episodes_within),
        )
        write, show = write_report, print_summary
    for warning in result.warnings:
        notify(warning, label="warning")
    written = write(result, out)
    if report is not None:
        from xsel.report import write_evaluation_report

        written.append(
            write_evaluation_report(report, result.summary, settings=result.settings, warnings=result.warnings)
        )
    if as_json:
        typer.echo(json.dumps({"settings": result.settings, "summary": result.summary.to_dict("records")}, indent=2))
        return
    console = Console()
    show(result, console)
    console.print(f"Wrote {', '.join(p.name for p in written)} to {out}", soft_wrap=True, markup=False)
