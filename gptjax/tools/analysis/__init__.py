"""Checkpoint analysis (``experiments.analyze``): ``analyze(workdir, Options(...))`` computes, ``write_report`` writes
report.md, analysis.json and the plots.

Modules: ``runs`` (a run's checkpoints, config and networks), ``params`` (counts, norms, differences by module and
layer), ``analyze`` (the whole analysis, asking the run's stage for its loss and sections), ``report``.
"""

from gptjax.tools.analysis.analyze import DEFAULT_CHAT_PROMPTS, SPLITS, Options, analyze, compare_with, last_metrics
from gptjax.tools.analysis.params import difference, layer_leaves, module_norms, param_counts
from gptjax.tools.analysis.report import write_report
from gptjax.tools.analysis.runs import Run, open_run

__all__ = ["DEFAULT_CHAT_PROMPTS", "SPLITS", "Options", "Run", "analyze", "compare_with", "difference",
           "last_metrics", "layer_leaves", "module_norms", "open_run", "param_counts", "write_report"]
