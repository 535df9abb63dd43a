"""`odis experiment`: the paper's comparisons as one command (a grid of runs x paired seeds, one budget, one k-NN),
reported with paired differences and their 95% intervals.

    spec.py    the spec (experiments/*.yaml) and its presets
    data.py    the data (synthetic scenes, or given shards) and each run's box source (GT, jitter:S, random, ...)
    run.py     train and evaluate every (run, seed), resumably
    report.py  results.json / results.md / results.png
"""
from odis.pipelines.experiment.report import report_experiment, summarise
from odis.pipelines.experiment.run import ExperimentError, run_experiment
from odis.pipelines.experiment.spec import Spec, SpecError, load_spec

__all__ = ["ExperimentError", "Spec", "SpecError", "load_spec", "report_experiment", "run_experiment", "summarise"]
