"""Scaling-law fits recover the parameters that generated synthetic data; the binary writes fit.json and plots.

References: data generated from Kaplan et al.'s L(N) (α_N 0.076, N_c 8.8e13) and Hoffmann et al.'s L(N, D)
(E 1.69, A 406.4, B 410.7, α 0.34, β 0.28) with seeded multiplicative noise; brute-force minimisation of L at
fixed compute for the optimal allocation; the definition of the Pareto frontier checked pairwise.
Tolerances: L(N) with 1% noise over 8 sizes (slope standard error ≈ 0.0016): α within 0.005, exact without
noise; L(N, D) on an 8×8 grid with 1% noise: α, β and E each within 10%.
"""

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import fit_scaling
from gptjax.tools import scaling

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}


def _kaplan(n, noise, seed=0):
    rng = np.random.default_rng(seed)
    return (scaling.KAPLAN_N_C / n) ** scaling.KAPLAN_ALPHA_N * np.exp(rng.normal(0.0, noise, len(n)))


def test_power_law_recovers_kaplan_parameters():
    n = np.geomspace(1e5, 1e8, 8)
    exact = scaling.fit_power_law(n, _kaplan(n, 0.0))
    assert exact["alpha"] == pytest.approx(scaling.KAPLAN_ALPHA_N, rel=1e-9)
    assert exact["n_c"] == pytest.approx(scaling.KAPLAN_N_C, rel=1e-6)
    noisy = scaling.fit_power_law(n, _kaplan(n, 0.01))
    assert abs(noisy["alpha"] - scaling.KAPLAN_ALPHA_N) < 0.005


def test_bootstrap_interval_contains_true_alpha():
    n = np.geomspace(1e5, 1e8, 8)
    runs = scaling.Runs(tuple(map(str, range(8))), n, np.full(8, 1e9), 6e9 * n, _kaplan(n, 0.01, seed=1))
    result = scaling.analyze(runs, num_bootstrap=500)
    lo, hi = result["power_law"]["alpha"]["ci95"]
    assert lo < scaling.KAPLAN_ALPHA_N < hi
    assert 0.0 < hi - lo < 0.03  # an interval, not a point, and informative
    assert result["chinchilla"] is None and result["frontier"] is None  # one token budget: nothing 2-D


def test_chinchilla_fit_recovers_parameters_on_a_dense_grid():
    n, d = (a.ravel() for a in np.meshgrid(np.geomspace(1e7, 1e10, 8), np.geomspace(3e8, 3e11, 8)))
    rng = np.random.default_rng(0)
    loss = scaling.chinchilla_loss(n, d, CHINCHILLA) * np.exp(rng.normal(0.0, 0.01, n.size))
    fit = scaling.fit_chinchilla(n, d, loss)
    for name in ("alpha", "beta", "E"):
        assert fit[name] == pytest.approx(CHINCHILLA[name], rel=0.10), name


def test_optimal_allocation_matches_brute_force_minimum():
    k, flops = 6.0, 1e21
    alloc = scaling.optimal_allocation(CHINCHILLA, k)
    assert alloc["a"] == pytest.approx(0.28 / 0.62)
    log_n = np.linspace(np.log(1e6), np.log(1e13), 200_001)
    n = np.exp(log_n)
    best_n = n[np.argmin(scaling.chinchilla_loss(n, flops / (k * n), CHINCHILLA))]
    assert alloc["G"] * (flops / k) ** alloc["a"] == pytest.approx(best_n, rel=1e-3)


def test_compute_frontier_is_the_pareto_set():
    rng = np.random.default_rng(3)
    flops, loss = rng.uniform(1, 100, 40), rng.uniform(2, 5, 40)
    frontier = set(scaling.compute_frontier(flops, loss).tolist())
    for i in range(40):
        dominated = any(flops[j] <= flops[i] and loss[j] <= loss[i] and j != i for j in range(40))
        assert (i in frontier) == (not dominated)


def _write_results(path, n, d, loss, status=None):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "model.d_model", "params", "non_embedding_params", "tokens", "flops", "final_val_loss",
                    "best_val_loss", "wall_time_s", "steps", "status"])
        for i, (ni, di, li) in enumerate(zip(n, d, loss)):
            w.writerow([f"run{i}", 64, ni * 1.2, ni, di, 6 * ni * di, li, li, 1.0, 10,
                        status[i] if status else "finished"])
    return str(path)


def test_binary_writes_fit_json_and_plots(tmp_path):
    n, d = (a.ravel() for a in np.meshgrid(np.geomspace(1e6, 1e8, 4), np.geomspace(1e8, 1e10, 3)))
    loss = scaling.chinchilla_loss(n, d, CHINCHILLA) * np.exp(np.random.default_rng(0).normal(0, 0.005, n.size))
    results = _write_results(tmp_path / "results.csv", n, d, loss)
    fit = fit_scaling.run(results, str(tmp_path / "out"), "non_embedding_params", "final_val_loss",
                          num_bootstrap=100, num_bootstrap_2d=10, seed=0)
    for name in ("loss_vs_params.png", "chinchilla_fit.png", "compute_frontier.png"):
        path = tmp_path / "out" / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000, name
    with open(tmp_path / "out" / "fit.json") as f:
        stored = json.load(f, parse_constant=lambda c: pytest.fail(f"fit.json holds {c}"))  # strict JSON
    assert stored == json.loads(json.dumps(fit))
    assert stored["chinchilla"]["alpha"]["ci95"][0] <= stored["chinchilla"]["alpha"]["value"]
    assert stored["frontier"]["runs"][0] == "run0"  # the cheapest run is on the frontier by definition

    # One token budget: only the L(N) fit and its plot.
    single = _write_results(tmp_path / "single.csv", n[:4], np.full(4, 1e9), loss[:4])
    fit = fit_scaling.run(single, str(tmp_path / "single"), "non_embedding_params", "final_val_loss", 50, 5, 0)
    assert fit["chinchilla"] is None and sorted(os.listdir(tmp_path / "single")) == ["fit.json", "loss_vs_params.png"]


def test_unusable_tables_are_one_clear_error(tmp_path):
    empty = _write_results(tmp_path / "empty.csv", [], [], [])
    with pytest.raises(scaling.ScalingError, match="empty.csv has no finished runs with a final_val_loss"):
        scaling.load_runs(empty)
    unfinished = _write_results(tmp_path / "unfinished.csv", [1e6, 1e7], [1e9] * 2, [math.nan] * 2,
                                status=["incomplete", "pending"])
    with pytest.raises(scaling.ScalingError, match=r"no finished runs.*statuses \['incomplete', 'pending'\]"):
        scaling.load_runs(unfinished)
    one = _write_results(tmp_path / "one.csv", [1e6], [1e9], [3.0])
    with pytest.raises(scaling.ScalingError, match="at least 2 different sizes .* found 1 run"):
        scaling.load_runs(one)
    with pytest.raises(scaling.ScalingError, match="does not exist"):
        scaling.load_runs(str(tmp_path / "missing.csv"))
    proc = subprocess.run([sys.executable, "-m", "experiments.fit_scaling", f"--results={empty}"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.startswith("error:") and "Traceback" not in proc.stderr
