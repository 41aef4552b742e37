"""Fit scaling laws to a sweep's results table; write fit.json and log-log plots, print the fitted parameters.

    python -m experiments.fit_scaling --results=workdirs/sweep/results.csv --out=workdirs/sweep

Always: L(N) = (N_c/N)^α with a 95% bootstrap interval (loss_vs_params.png, with Kaplan's α_N slope). When the
runs differ in tokens: Hoffmann et al.'s E + A/N^α + B/D^β (chinchilla_fit.png) and the compute-optimal
frontier with N_opt(C) ∝ C^a (compute_frontier.png). Formulas: gptjax/tools/scaling.py.
"""

import json
import os

from absl import flags

from gptjax import cli
from gptjax.tools import scaling

_RESULTS = flags.DEFINE_string("results", None, "results.csv written by experiments.sweep.", required=True)
_OUT = flags.DEFINE_string("out", None, "Directory for fit.json and the PNGs (default: the results' directory).")
_N_COLUMN = flags.DEFINE_enum("n_column", "non_embedding_params", ["non_embedding_params", "params"],
                              "Model size N: non-embedding parameters (Kaplan) or all parameters (Chinchilla).")
_LOSS_COLUMN = flags.DEFINE_enum("loss_column", "final_val_loss", ["final_val_loss", "best_val_loss"],
                                 "Which validation loss is L.")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap", 1000, "Bootstrap resamples for L(N).")
_BOOTSTRAP_2D = flags.DEFINE_integer("bootstrap_2d", 200, "Bootstrap resamples for L(N, D) (each a full refit).")
_SEED = flags.DEFINE_integer("seed", 0, "Bootstrap seed.")

_N_LABELS = {"non_embedding_params": "non-embedding parameters N", "params": "parameters N"}


def run(results: str, out: str, n_column: str, loss_column: str, num_bootstrap: int, num_bootstrap_2d: int,
        seed: int) -> dict:
    """The whole job; returns what fit.json holds. Raises scaling.ScalingError on an unusable table."""
    runs = scaling.load_runs(results, n_column, loss_column)
    result = scaling.analyze(runs, num_bootstrap=num_bootstrap, num_bootstrap_2d=num_bootstrap_2d, seed=seed)
    os.makedirs(out, exist_ok=True)
    n_label, loss_label = _N_LABELS[n_column], f"validation loss ({loss_column}, nats/token)"
    plots = [scaling.plot_power_law(result, runs, os.path.join(out, "loss_vs_params.png"), n_label, loss_label)]
    if result["chinchilla"]:
        plots.append(scaling.plot_chinchilla(result, runs, os.path.join(out, "chinchilla_fit.png"), n_label,
                                             loss_label))
    if result["frontier"]:
        plots.append(scaling.plot_frontier(result, runs, os.path.join(out, "compute_frontier.png"), n_label,
                                           loss_label))
    fit = {"results": results, "n_column": n_column, "loss_column": loss_column, "seed": seed,
           **scaling.public(result), "plots": plots}
    with open(os.path.join(out, "fit.json"), "w") as f:
        json.dump(fit, f, indent=1)
    print(scaling.format_table(fit, n_column, loss_column))
    print(f"wrote {os.path.join(out, 'fit.json')} and {', '.join(plots)}")
    return fit


def main(argv):
    del argv
    run(_RESULTS.value, _OUT.value or os.path.dirname(os.path.abspath(_RESULTS.value)), _N_COLUMN.value,
        _LOSS_COLUMN.value, _BOOTSTRAP.value, _BOOTSTRAP_2D.value, _SEED.value)


if __name__ == "__main__":
    cli.run(main)
