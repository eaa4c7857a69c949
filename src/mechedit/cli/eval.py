"""`mechedit eval`: edit N requests from a CounterFact-layout file with any method and measure the edits.

One-request methods (ROME) edit one record at a time, restoring the model between records; batched methods make
one edit of all N (``--one-at-a-time`` forces single edits for them too). The unedited model's side is computed
once (:class:`mechedit.evaluation.Evaluator`). Prints metric, value, 95% interval and the unedited value; writes
``evaluation.json`` (the :class:`~mechedit.evaluation.EvalResult`), ``records.csv`` and ``evaluation.html`` (the
bar chart) into ``--out``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Annotated, Optional

import typer

from mechedit.cli import app
from mechedit.cli.info import ModelOpt
from mechedit.editing.methods import METHODS
from mechedit.errors import InputError


def pick_records(model, data: Path | None, n: int, seed: int):
    """``n`` records drawn at random (``seed``) from ``data``, or from the embedded world's exported records
    when no file is given; in file order."""
    from mechedit.data import read_counterfact

    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise InputError(f"-n must be a positive number of records, got {n!r}")
    if data is not None:
        records, source = read_counterfact(data), str(data)
    else:
        world_file = model.path / "world.json" if model.path else None
        if world_file is None or not world_file.is_file():
            raise InputError("pass --data FILE (a CounterFact-layout JSON file); only the embedded world model "
                             "has default records")
        from mechedit.toy.export import world_records
        from mechedit.toy.world import World

        records, source = world_records(World.load(world_file)), "the embedded world's records"
    if not records:
        raise InputError(f"{source} holds no records")
    if n > len(records):
        raise InputError(f"-n {n} asks for more records than {source} holds ({len(records)})")
    return [records[i] for i in sorted(random.Random(seed).sample(range(len(records)), n))]


def print_summary(result, title: str | None = None) -> None:
    """The result's summary as a rich table: metric, edited value, 95% interval, unedited value."""
    from rich.console import Console
    from rich.table import Table

    pre = result.summary(edited=False)
    table = Table(title=title)
    for col, just in (("metric", "left"), ("value", "right"), ("95% CI", "right"), ("unedited", "right")):
        table.add_column(col, justify=just)
    for name, (mean, lo, hi) in result.summary().items():
        u = pre.get(name, (None,))[0]
        table.add_row(name, f"{mean:.3f}", f"[{lo:.3f}, {hi:.3f}]", "" if u is None else f"{u:.3f}")
    Console().print(table)


def write_result(result, out: Path) -> list[Path]:
    """evaluation.json, records.csv and evaluation.html (the bar chart) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [result.save(out / "evaluation.json"), out / "records.csv", out / "evaluation.html"]
    result.to_frame().to_csv(paths[1], index=False)
    result.plot().write_html(paths[2], include_plotlyjs="cdn")
    return paths


@app.command("eval")
def eval_command(
    method: Annotated[str, typer.Option(help=f"Editing method: {', '.join(METHODS)}.")] = "rome",
    data: Annotated[Optional[Path], typer.Option(help="CounterFact-layout JSON file (either layout). Default: "
                                                 "the embedded world's exported records.")] = None,
    n: Annotated[int, typer.Option("-n", help="Number of records, drawn at random with --seed.")] = 10,
    seed: Annotated[int, typer.Option(help="Seed of the record draw.")] = 0,
    hp: Annotated[Optional[list[str]], typer.Option(help="A hyperparameter of the method as name=value "
                                                    "(repeatable).")] = None,
    layer: Annotated[Optional[str], typer.Option(help="Layer(s) to edit: N, 'N,M,..' or 'auto'.")] = None,
    modules: Annotated[Optional[str], typer.Option(help="Modules an adapter/fine-tuning method trains: 'auto' "
                                                   "or comma-separated names.")] = None,
    one_at_a_time: Annotated[bool, typer.Option("--one-at-a-time", help="Edit and evaluate one record at a "
                                                "time (restoring between) also for batched methods.")] = False,
    generation: Annotated[bool, typer.Option(help="Measure generation (fluency, consistency, degeneration); "
                                             "--no-generation is several times faster.")] = True,
    out: Annotated[Optional[Path], typer.Option(help="Directory for evaluation.json, records.csv and "
                                                "evaluation.html.")] = None,
    model: ModelOpt = None,
) -> None:
    """Edit N records with a method and evaluate: CounterFact ES/PS/NS, fluency, consistency, exact-output
    locality, KL, world accuracy and degeneration, each with a 95% interval."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from mechedit.cli.edit import method_hparams
    from mechedit.editing.methods import edit as run_edit
    from mechedit.editing.methods import get_method
    from mechedit.evaluation import EvalConfig, EvalResult, Evaluator
    from mechedit.model import load

    spec = get_method(method)  # an unknown method fails here, before the model loads
    if n <= 0:
        raise InputError(f"-n must be a positive number of records, got {n}")
    method_hparams(method, hp or [], layer, modules)  # bad options: one clear line before loading anything
    m = load(model)
    hparams = method_hparams(method, hp or [], layer, modules, m)
    records = pick_records(m, data, n, seed)
    evaluator = Evaluator(m, EvalConfig(generation=generation))
    single = one_at_a_time or not spec.batched
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=True) as bar:
        task = bar.add_task("unedited model", total=len(records))
        evaluator.prepare(records, lambda stage, done, total: bar.update(task, completed=done, total=total))
        results = []
        if single:
            bar.update(task, description=f"{method}: edit + evaluate", completed=0, total=len(records))
            for i, r in enumerate(records):
                handle = run_edit(m, [r], method, hparams)
                try:
                    results.append(evaluator.evaluate(handle, [r], index=i))
                finally:
                    handle.restore()
                bar.update(task, completed=i + 1)
                if out is not None and (i + 1) % 25 == 0:  # a long run keeps what it has measured so far
                    out.mkdir(parents=True, exist_ok=True)
                    EvalResult.merge(results).save(out / "evaluation.partial.json")
        else:
            bar.update(task, description=f"{method}: one edit of {len(records)}", completed=0, total=None)
            handle = run_edit(m, records, method, hparams)
            try:
                bar.update(task, description="evaluate", completed=0, total=len(records))
                results.append(evaluator.evaluate(
                    handle, records, lambda stage, done, total: bar.update(task, completed=done, total=total)))
            finally:
                handle.restore()
    result = EvalResult.merge(results)
    how = "one at a time" if single else "in one edit"
    print_summary(result, title=f"{method} on {m.name}: {len(records)} records, {how}")
    if out is not None:
        paths = write_result(result, out)
        (out / "evaluation.partial.json").unlink(missing_ok=True)
        typer.echo("wrote " + ", ".join(str(p) for p in paths))
