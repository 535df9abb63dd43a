"""Experiment commands: experiment run | report."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from odis.cli.common import app, check_out_path, fail

PRESET_HELP = "One of the spec's presets (mini_repro.yaml: smoke, cpu, gpu and others; its `presets:` lists them)."
experiment_app = typer.Typer(help="The paper's comparisons as one command: a grid of runs x paired seeds at one "
                             "budget, k-NN with and without the box, paired differences with 95% intervals.",
                             no_args_is_help=True)
app.add_typer(experiment_app, name="experiment")


@experiment_app.command("run")
def experiment_run_cmd(
    spec: Path = typer.Argument(..., help="The spec, e.g. experiments/mini_repro.yaml."),
    out: Path = typer.Option(..., "--out", help="Experiment folder; rerunning continues with the runs not finished."),
    preset: Optional[str] = typer.Option(None, "--preset", help=PRESET_HELP),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
    jobs: Optional[int] = typer.Option(None, "--jobs", min=1, help="Runs trained at once on the device (default: "
                                       "the spec's train.jobs, else 1; several small runs fill a GPU better)."),
) -> None:
    """Train every run of SPEC for each seed at the same budget, evaluate each by k-NN (none and mask), and write
    OUT/results.json, results.md (mean ± std, paired differences with 95% intervals) and results.png.

    \b
    odis experiment run experiments/mini_repro.yaml --preset smoke --out runs/exp-smoke
    """
    from odis.pipelines.experiment import ExperimentError, SpecError, load_spec, run_experiment

    check_out_path(out, "--out", folder=True)
    try:
        report = run_experiment(load_spec(spec, preset), out, device=device, echo=typer.echo, jobs=jobs)
    except (SpecError, ExperimentError, FileNotFoundError, ValueError) as e:
        fail(str(e))
    typer.echo((out / "results.md").read_text())
    typer.echo(f"wrote {out / 'results.json'}, results.md, results.png ({len(report['runs'])} runs)")


@experiment_app.command("prepare")
def experiment_prepare_cmd(
    spec: Path = typer.Argument(..., help="The spec, e.g. experiments/mini_repro.yaml."),
    out: Path = typer.Option(..., "--out", help="Experiment folder: its data/ is made (synthetic scenes, shards)."),
    preset: Optional[str] = typer.Option(None, "--preset", help=PRESET_HELP),
) -> None:
    """Make the experiment's data only (e.g. on a CPU machine, to carry OUT to a GPU one): `experiment run` with
    the same --out then trains on it without making it again. On synthetic scenes it also prints how much of the
    patch grid, and of the distractors, the target's [OBJ] mask covers (measure it before training)."""
    from odis.pipelines.experiment import SpecError, load_spec
    from odis.pipelines.experiment.data import prepare_data
    from odis.pipelines.experiment.report import coverage_lines, obj_mask_coverage

    check_out_path(out, "--out", folder=True)
    root = out.resolve()
    try:
        s = load_spec(spec, preset)
        prepare_data(s, root, typer.echo)
    except (SpecError, FileNotFoundError, ValueError) as e:
        fail(str(e))
    typer.echo(f"data ready under {out / 'data'}")
    coverage = coverage_lines(obj_mask_coverage(s, root))
    if coverage:
        typer.echo(coverage[0])


@experiment_app.command("report")
def experiment_report_cmd(out: Path = typer.Argument(..., help="An experiment folder (odis experiment run --out).")):
    """Write the report again from the finished runs (also of an experiment still running or killed)."""
    from odis.pipelines.experiment import SpecError, report_experiment

    try:
        report = report_experiment(out)
    except (SpecError, ValueError) as e:
        fail(str(e))
    typer.echo((out / "results.md").read_text())
    typer.echo(f"wrote {out / 'results.md'} ({len(report['runs'])} runs)")
