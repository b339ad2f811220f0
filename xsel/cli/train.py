"""``xsel train …``: learn models from a store (``train selector``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from xsel.cli import app
from xsel.cli.embed import Device
from xsel.cli.evaluate import split_list

train_app = typer.Typer(help="Train models: a learned selector from labelled episodes.", no_args_is_help=True)
app.add_typer(train_app, name="train")


@train_app.command("selector")
def train_selector_command(
    store: Annotated[Path, typer.Argument(help="Embedding store with label columns.")],
    conditions: Annotated[str, typer.Option(help="Comma-separated seen conditions to train on.")],
    val_conditions: Annotated[str, typer.Option(help="Comma-separated unseen conditions for validation.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder: selector.pt, last.pt, metrics.csv.")],
    negative: Annotated[str, typer.Option(help="Label column of the negative class.")] = "No Finding",
    uncertain: Annotated[
        str, typer.Option(help="Uncertain labels (-1) count as: positive, negative or ignore.")
    ] = "positive",
    k: Annotated[int, typer.Option("--k", "-k", help="Labels per episode.")] = 20,
    pool_size: Annotated[int, typer.Option(help="Images in each episode's pool.")] = 1000,
    query_size: Annotated[int, typer.Option(help="Images in each episode's query set.")] = 100,
    episodes: Annotated[int, typer.Option(help="Training episodes in total.")] = 20_000,
    batch_size: Annotated[int, typer.Option(help="Episodes per gradient step.")] = 16,
    classifier: Annotated[str, typer.Option(help="Few-shot classifier whose query AUROC is the reward.")] = "cosine",
    use_metadata: Annotated[bool, typer.Option(help="Also feed sex, age and frontal view to the selector.")] = False,
    learning_rate: Annotated[float, typer.Option(help="Adam learning rate (×0.1 after 60% of the steps).")] = 1e-4,
    val_every: Annotated[int, typer.Option(help="Steps between validations (and checkpoints).")] = 50,
    val_episodes: Annotated[int, typer.Option(help="Fixed validation episodes per validation condition.")] = 20,
    max_minutes: Annotated[
        float, typer.Option(help="Stop after this many minutes, keeping the best checkpoint.")
    ] = 10.0,
    seed: Annotated[int, typer.Option(min=0, help="Seed of episodes, sampling and initialisation.")] = 0,
    device: Annotated[
        Device, typer.Option(help="Where the selector trains; auto takes CUDA when present.")
    ] = Device.auto,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last checkpoint.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Meta-learn a selector (MedSelect: BiLSTM + REINFORCE) on labelling episodes of seen conditions,
    validated on unseen ones; the best checkpoint is RUN_DIR/selector.pt.

    [bold]Examples[/bold]

      xsel train selector pool.h5 --conditions Effusion,Cardiomegaly --val-conditions Edema --out runs/sel
      xsel train selector pool.h5 --conditions Effusion --val-conditions Edema --out runs/sel --resume
      xsel select pool.h5 --k 20 --checkpoint runs/sel/selector.pt --out to_label.csv
    """
    from xsel.medselect import SelectorConfig
    from xsel.train_selector import train_selector

    config = SelectorConfig(
        conditions=split_list(conditions, "--conditions"),
        val_conditions=split_list(val_conditions, "--val-conditions"),
        negative=negative,
        uncertain=uncertain,
        k=k,
        pool_size=pool_size,
        query_size=query_size,
        episodes=episodes,
        batch_size=batch_size,
        classifier=classifier,
        use_metadata=use_metadata,
        learning_rate=learning_rate,
        val_every=val_every,
        val_episodes=val_episodes,
        max_minutes=max_minutes,
        seed=seed,
    )
    result = train_selector(store, out, config, resume=resume, device=device.value, show_progress=not quiet)
    typer.echo(
        f"Trained {result.steps} steps ({result.episodes} episodes) in {result.seconds / 60:.1f} min, stopped by "
        f"{result.stopped_by}. Best validation AUROC {result.best_val_auroc:.3f} at step {result.best_step} "
        f"(random picks: {result.random_val_auroc:.3f}) → {result.run_dir / 'selector.pt'}"
    )
