"""`mechedit toy ...`: the embedded world model: rebuild it, export its facts, measure its quality."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mechedit.cli import app

toy_app = typer.Typer(help="The embedded world model: build, export, quality.", no_args_is_help=True)
app.add_typer(toy_app, name="toy")


# -- mechedit toy build / quality ------------------------------------------------------------------------------


@toy_app.command("build")
def build(
    out: Annotated[Optional[Path], typer.Option(help="Where to write the checkpoint directory. Default: the "
                                                "package's own embedded model directory (replaced).")] = None,
    arch: Annotated[str, typer.Option(help="'llama' (the shipped model) or 'gpt2' (same world on GPT-2, to "
                                      "exercise GPT-2 code paths).")] = "llama",
    seed: Annotated[int, typer.Option(help="Seed of the world and of training; same seed, same weights.")] = 0,
    steps: Annotated[Optional[int], typer.Option(help="Training steps (default: the shipped recipe's).")] = None,
    threads: Annotated[int, typer.Option(help="CPU threads for training. The shipped model was built with 2; same "
                                         "threads + seed = bit-identical weights.")] = 2,
) -> None:
    """Regenerate the embedded world model from its seed (about 10-15 minutes on 2 CPU cores)."""
    from dataclasses import replace

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from mechedit.model import embedded_model_dir
    from mechedit.toy.build import build as build_model
    from mechedit.toy.train import ToyModelConfig

    if arch not in ("llama", "gpt2"):
        raise typer.BadParameter("choose 'llama' or 'gpt2'", param_hint="--arch")
    cfg = ToyModelConfig(arch=arch, seed=seed)
    if steps is not None:
        if steps <= 0:
            raise typer.BadParameter("must be positive", param_hint="--steps")
        cfg = replace(cfg, steps=steps)
    target = out or (embedded_model_dir() if arch == "llama" else embedded_model_dir().with_name("toy-gpt2"))
    cols = [TextColumn("training"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
            TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*cols) as bar:
        task = bar.add_task("train", total=cfg.steps, loss=float("nan"))
        record = build_model(target, cfg, world_seed=seed, threads=threads,
                             progress=lambda step, loss: bar.update(task, completed=step + 1, loss=loss))
    r = record["recall"]
    typer.echo(f"wrote {target} in {record['train_seconds']:.0f}s: recall train {r['train']:.3f}, "
               f"held-out {r['heldout']:.3f}, sums {r['sums']:.3f}")


@toy_app.command("quality")
def quality(
    model: Annotated[Optional[Path], typer.Option(help="A world-model directory (default: the embedded one).")] = None,
    n_facts: Annotated[int, typer.Option(help="Facts to average the causal trace over.")] = 60,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Measure the world model: recall (training templates, held-out paraphrases, sums) and where the causal
    trace's MLP effect at the last subject token peaks."""
    import json

    from mechedit.toy.quality import measure

    report = measure(model, n_facts=n_facts)
    if as_json:
        typer.echo(json.dumps(report, indent=1))
        return
    r, t = report["recall"], report["trace"]
    typer.echo(f"recall: train {r['train']:.3f}  held-out {r['heldout']:.3f}  sums {r['sums']:.3f}")
    typer.echo(f"MLP effect at last subject token (window {t['window']}), by layer: "
               + " ".join(f"{v:.3f}" for v in t["mlp_last_subject"]))
    typer.echo(f"peak at layer {t['peak_layer']} of {len(t['mlp_last_subject'])}; peak / total effect = "
               f"{t['peak_share']:.2f} (total = clean {t['high']:.3f} - corrupted {t['low']:.3f})")


# -- mechedit toy export ---------------------------------------------------------------------------------------


@toy_app.command("export")
def export(
    path: Annotated[Path, typer.Argument(help="Where to write the records (JSON, CounterFact's EasyEdit layout).")],
    n: Annotated[Optional[int], typer.Option("-n", "--n", help="Export a seeded random subset of N facts. "
                                             "Default: every fact.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for the subset, the counterfactual targets, the templates and "
                                      "the neighbours.")] = 0,
) -> None:
    """Write the embedded world's facts as CounterFact-style edit requests, readable by `read_counterfact`."""
    from mechedit.data import write_counterfact
    from mechedit.toy.export import embedded_world, world_records

    records = world_records(embedded_world(), n=n, seed=seed)
    write_counterfact(records, path)
    typer.echo(f"wrote {len(records)} records to {path}")
