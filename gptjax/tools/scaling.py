"""Scaling-law fits of a sweep's results table, with bootstrap intervals, the compute-optimal frontier and plots.

- Kaplan et al. 2020: L(N) = (N_c / N)^α, fitted by least squares on log L = α·log N_c − α·log N (exact maximum
  likelihood under multiplicative noise). N is the non-embedding parameter count by default, as in Kaplan.
- Hoffmann et al. 2022 (Chinchilla), when the token count D varies: L(N, D) = E + A/N^α + B/D^β, fitted as the
  paper does — Huber loss (δ = 1e-3) between log L and LSE(a − α·log N, b − β·log D, e) with A = e^a, B = e^b,
  E = e^e, minimised by L-BFGS from a grid of initialisations, best result kept.
- Uncertainty: resample runs with replacement, refit, report the 2.5 / 97.5 percentiles of each parameter.
- Compute-optimal frontier (D varies): the runs with lower loss than every cheaper run, the regression
  N_opt ∝ C^a through them, and from the Chinchilla fit a = β / (α + β) (minimising L at fixed C = k·N·D).
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import math
from collections.abc import Sequence

import numpy as np
import scipy.optimize

from gptjax.errors import UserError

KAPLAN_ALPHA_N = 0.076  # Kaplan et al. 2020, L(N) exponent for non-embedding parameters
KAPLAN_N_C = 8.8e13
HUBER_DELTA = 1e-3  # Hoffmann et al. 2022, App. D.2
# Hoffmann et al.'s initialisation grid (App. D.2): α, β, e, a, b.
CHINCHILLA_INIT_GRID = (np.arange(0.0, 2.01, 0.5), np.arange(0.0, 2.01, 0.5), np.arange(-1.0, 1.01, 0.5),
                        np.arange(0.0, 25.1, 5.0), np.arange(0.0, 25.1, 5.0))
CI_PERCENTILES = (2.5, 97.5)


class ScalingError(UserError, ValueError):
    """The results table cannot be fitted; the message names the file/column and what is missing."""


@dataclasses.dataclass(frozen=True)
class Runs:
    """The fit's view of a results table: one entry per finished run."""

    names: tuple[str, ...]
    n: np.ndarray  # parameters (non-embedding by default)
    d: np.ndarray  # tokens trained on
    flops: np.ndarray  # training FLOPs
    loss: np.ndarray  # validation loss (nats/token)

    def __len__(self) -> int:
        return len(self.names)

    def subset(self, idx) -> "Runs":
        idx = np.asarray(idx)
        return Runs(tuple(self.names[i] for i in idx), self.n[idx], self.d[idx], self.flops[idx], self.loss[idx])

    @property
    def tokens_vary(self) -> bool:
        return len(np.unique(self.d)) > 1


def _float(cell: str) -> float:
    try:
        return float(cell) if cell not in ("", None) else math.nan
    except ValueError:
        return math.nan


def load_runs(path: str, n_column: str = "non_embedding_params", loss_column: str = "final_val_loss") -> Runs:
    """Finished runs of ``results.csv`` with a positive N and a finite loss; fewer than two is an error."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            rows = list(reader)
    except FileNotFoundError:
        raise ScalingError(f"results table {path} does not exist; run `python -m experiments.sweep "
                           f"--sweep=... --root=DIR` first (it writes DIR/results.csv)") from None
    needed = ("name", n_column, "tokens", "flops", loss_column)
    missing = [c for c in needed if c not in columns]
    if rows and missing:
        raise ScalingError(f"{path} lacks column(s) {missing}; it has {list(columns)}")
    usable = [r for r in rows if r.get("status", "finished") == "finished"
              and _float(r[n_column]) > 0 and math.isfinite(_float(r[loss_column])) and _float(r[loss_column]) > 0]
    if not usable:
        statuses = sorted({r.get("status", "?") for r in rows})
        raise ScalingError(f"{path} has no finished runs with a {loss_column} ({len(rows)} rows"
                           f"{', statuses ' + str(statuses) if rows else ''}); nothing to fit. Finish the sweep "
                           f"(rerun experiments.sweep) or gather results with --mode=gather")
    runs = Runs(names=tuple(r["name"] for r in usable),
                n=np.array([_float(r[n_column]) for r in usable]),
                d=np.array([_float(r["tokens"]) for r in usable]),
                flops=np.array([_float(r["flops"]) for r in usable]),
                loss=np.array([_float(r[loss_column]) for r in usable]))
    if len(np.unique(runs.n)) < 2:
        raise ScalingError(f"{path}: a scaling fit needs finished runs of at least 2 different sizes "
                           f"({n_column}); found {len(runs)} run(s) of size {sorted(set(runs.n.tolist()))}: "
                           f"{list(runs.names)}")
    return runs


# ---------------------------------------------------------------------------------------------------------------
# L(N) = (N_c / N)^α


def fit_power_law(n, loss) -> dict[str, float]:
    """Least squares on log L = α·log N_c − α·log N. Returns alpha, log_n_c (natural log) and n_c."""
    x, y = np.log(np.asarray(n, float)), np.log(np.asarray(loss, float))
    slope, intercept = np.polyfit(x, y, 1)
    alpha = -slope
    log_n_c = intercept / alpha if alpha != 0 else math.inf
    return {"alpha": float(alpha), "log_n_c": float(log_n_c), "n_c": _safe_exp(log_n_c)}


def power_law_loss(n, alpha: float, log_n_c: float):
    return np.exp(alpha * (log_n_c - np.log(n)))


def _safe_exp(x: float) -> float:
    return float(math.exp(x)) if math.isfinite(x) and x < 700 else math.inf


# ---------------------------------------------------------------------------------------------------------------
# L(N, D) = E + A / N^α + B / D^β


def _chinchilla_terms(theta, log_n, log_d):
    a, b, e, alpha, beta = theta
    return np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])  # (3, runs)


def _huber_objective(theta, log_n, log_d, log_loss, delta):
    terms = _chinchilla_terms(theta, log_n, log_d)
    top = terms.max(0)
    weights = np.exp(terms - top)
    total = weights.sum(0)
    residual = top + np.log(total) - log_loss
    weights /= total  # d LSE / d term
    small = np.abs(residual) <= delta
    value = np.where(small, 0.5 * residual**2, delta * (np.abs(residual) - 0.5 * delta)).sum()
    dr = np.where(small, residual, delta * np.sign(residual))  # Huber'(residual)
    grad = np.array([(dr * weights[0]).sum(), (dr * weights[1]).sum(), (dr * weights[2]).sum(),
                     -(dr * weights[0] * log_n).sum(), -(dr * weights[1] * log_d).sum()])
    return value, grad


def _grid_objective(grid_TP, log_n, log_d, log_loss, delta):
    """Objective at many parameter vectors at once (rows of grid_TP): picks which inits to optimise."""
    a, b, e, alpha, beta = (grid_TP[:, i:i + 1] for i in range(5))
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.broadcast_to(e, (len(grid_TP), len(log_n)))])
    residual = np.logaddexp.reduce(terms, axis=0) - log_loss
    r = np.abs(residual)
    return np.where(r <= delta, 0.5 * r**2, delta * (r - 0.5 * delta)).sum(1)


def fit_chinchilla(n, d, loss, *, delta: float = HUBER_DELTA, inits: np.ndarray | None = None,
                   num_starts: int = 10) -> dict[str, float]:
    """Hoffmann et al.'s fit. ``inits`` rows are (a, b, e, alpha, beta) starting points; by default the paper's
    grid, of which the ``num_starts`` with the lowest initial objective are optimised (all 4500 would take
    seconds per fit: too many to bootstrap)."""
    log_n, log_d, log_loss = np.log(n), np.log(d), np.log(loss)
    if inits is None:
        alphas, betas, es, as_, bs = CHINCHILLA_INIT_GRID
        inits = np.array([(a, b, e, al, be) for al, be, e, a, b in itertools.product(alphas, betas, es, as_, bs)])
        order = np.argsort(_grid_objective(inits, log_n, log_d, log_loss, delta))
        inits = inits[order[:num_starts]]
    # Optimise in centred coordinates: a - alpha*log N = (a - alpha*m_n) - alpha*(log N - m_n). With log N ~ 20,
    # a and alpha are otherwise almost collinear and L-BFGS stalls far from the optimum.
    m_n, m_d = log_n.mean(), log_d.mean()
    shift = np.array([[1, 0, 0, -m_n, 0], [0, 1, 0, 0, -m_d], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 1]])
    best = None
    for x0 in np.atleast_2d(inits):
        result = scipy.optimize.minimize(_huber_objective, shift @ x0, args=(log_n - m_n, log_d - m_d, log_loss,
                                         delta), jac=True, method="L-BFGS-B",
                                         options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-10})
        if best is None or result.fun < best.fun:
            best = result
    a, b, e, alpha, beta = np.linalg.solve(shift, best.x)
    return {"E": float(np.exp(e)), "A": _safe_exp(a), "B": _safe_exp(b), "alpha": float(alpha),
            "beta": float(beta), "objective": float(best.fun), "theta": [float(a), float(b), float(e),
                                                                      float(alpha), float(beta)]}


def chinchilla_loss(n, d, fit: dict) -> np.ndarray:
    return fit["E"] + fit["A"] / np.asarray(n, float) ** fit["alpha"] + fit["B"] / np.asarray(d, float) ** fit["beta"]


def optimal_allocation(fit: dict, flops_per_param_token: float) -> dict[str, float]:
    """Minimise E + A/N^α + B/D^β at fixed C = k·N·D: N_opt = G·(C/k)^a, D_opt = (C/k)^b / G (Hoffmann eq. 4)."""
    alpha, beta = fit["alpha"], fit["beta"]
    if alpha <= 0 or beta <= 0:
        return {"a": math.nan, "b": math.nan, "G": math.nan}
    log_g = (math.log(alpha) + math.log(fit["A"]) - math.log(beta) - math.log(fit["B"])) / (alpha + beta)
    return {"a": beta / (alpha + beta), "b": alpha / (alpha + beta), "G": _safe_exp(log_g),
            "log_G": log_g, "k": flops_per_param_token}


# ---------------------------------------------------------------------------------------------------------------
# Compute-optimal frontier.


def compute_frontier(flops, loss) -> np.ndarray:
    """Indices (by increasing FLOPs) of runs with a lower loss than every run of no more FLOPs."""
    order = np.lexsort((loss, flops))
    frontier, best = [], math.inf
    for i in order:
        if loss[i] < best:
            frontier.append(i)
            best = loss[i]
    return np.array(frontier, dtype=int)


def fit_frontier_exponent(flops, n) -> dict[str, float] | None:
    """log N = a·log C + c through frontier runs; None with fewer than two distinct C and N."""
    if len(np.unique(flops)) < 2 or len(np.unique(n)) < 2:
        return None
    a, c = np.polyfit(np.log(flops), np.log(n), 1)
    return {"a": float(a), "log_k": float(c)}


# ---------------------------------------------------------------------------------------------------------------
# Bootstrap.


def bootstrap(runs: Runs, fit_fn, num_samples: int, seed: int = 0, need_tokens_vary: bool = False) -> list[dict]:
    """Refit on ``num_samples`` resamples of the runs (with replacement). A resample the model cannot be fitted
    to (one size only; one token count for L(N, D)) is drawn again."""
    rng = np.random.default_rng(seed)
    fits, tries = [], 0
    while len(fits) < num_samples and tries < 20 * num_samples:
        tries += 1
        sample = runs.subset(rng.integers(0, len(runs), len(runs)))
        if len(np.unique(sample.n)) < 2 or (need_tokens_vary and not sample.tokens_vary):
            continue
        fits.append(fit_fn(sample))
    return fits


def interval(values: Sequence[float]) -> list[float]:
    values = np.asarray([v for v in values if math.isfinite(v)], float)
    if values.size == 0:
        return [math.nan, math.nan]
    return [float(p) for p in np.percentile(values, CI_PERCENTILES)]


def estimate(point: float, samples: Sequence[float]) -> dict:
    return {"value": float(point), "ci95": interval(samples)}


# ---------------------------------------------------------------------------------------------------------------
# The whole analysis of one table.


def analyze(runs: Runs, *, num_bootstrap: int = 1000, num_bootstrap_2d: int = 200, seed: int = 0) -> dict:
    """Every fit the table supports, as a JSON-ready dict (bootstrap samples kept under "_samples" for plots)."""
    result: dict = {"num_runs": len(runs), "kaplan_alpha_N": KAPLAN_ALPHA_N}

    # L(N): with several token budgets, each size's lowest loss (its largest useful budget) stands for L(N).
    if runs.tokens_vary:
        keep = [int(np.flatnonzero(runs.n == n)[np.argmin(runs.loss[runs.n == n])]) for n in np.unique(runs.n)]
        pl_runs, points = runs.subset(keep), "lowest loss of each size over its token budgets"
    else:
        pl_runs, points = runs, "all finished runs"
    pl = fit_power_law(pl_runs.n, pl_runs.loss)
    pl_samples = bootstrap(pl_runs, lambda r: fit_power_law(r.n, r.loss), num_bootstrap, seed)
    result["power_law"] = {
        "form": "L = (N_c / N)^alpha", "points": points, "num_points": len(pl_runs),
        "alpha": estimate(pl["alpha"], [s["alpha"] for s in pl_samples]),
        "N_c": {"value": pl["n_c"], "ci95": [_safe_exp(v) for v in interval([s["log_n_c"] for s in pl_samples])]},
        "log_N_c": estimate(pl["log_n_c"], [s["log_n_c"] for s in pl_samples]),
        "bootstrap_samples": len(pl_samples),
        "_samples": pl_samples, "_runs": pl_runs,
    }

    result["chinchilla"] = None
    if not runs.tokens_vary:
        result["chinchilla_skipped"] = "all runs trained on the same number of tokens"
    elif len(runs) < 6 or len(np.unique(runs.n)) < 2:
        result["chinchilla_skipped"] = f"needs >= 6 runs over >= 2 sizes and >= 2 token counts; have {len(runs)}"
    else:
        fit = fit_chinchilla(runs.n, runs.d, runs.loss)
        samples = bootstrap(runs, lambda r: fit_chinchilla(r.n, r.d, r.loss, inits=np.array([fit["theta"]])),
                            num_bootstrap_2d, seed, need_tokens_vary=True)
        k = float(np.median(runs.flops / (runs.n * runs.d)))
        alloc = optimal_allocation(fit, k)
        alloc_samples = [optimal_allocation(s, k)["a"] for s in samples]
        result["chinchilla"] = {
            "form": "L = E + A / N^alpha + B / D^beta", "huber_delta": HUBER_DELTA, "num_points": len(runs),
            **{p: estimate(fit[p], [s[p] for s in samples]) for p in ("E", "A", "B", "alpha", "beta")},
            "n_opt_exponent": estimate(alloc["a"], alloc_samples),
            "G": alloc["G"], "flops_per_param_token": k, "bootstrap_samples": len(samples),
            "_fit": fit, "_samples": samples,
        }

    result["frontier"] = None
    if runs.tokens_vary:
        idx = compute_frontier(runs.flops, runs.loss)
        exponent = fit_frontier_exponent(runs.flops[idx], runs.n[idx])
        result["frontier"] = {
            "runs": [runs.names[i] for i in idx],
            "points": [{"name": runs.names[i], "flops": float(runs.flops[i]), "params": float(runs.n[i]),
                        "tokens": float(runs.d[i]), "loss": float(runs.loss[i])} for i in idx],
            "n_opt_exponent": exponent["a"] if exponent else None,
            "_fit": exponent,
        }
    return result


def public(result: dict) -> dict:
    """``analyze``'s result without the private (underscore) entries: what fit.json holds."""
    if isinstance(result, dict):
        return {k: public(v) for k, v in result.items() if not k.startswith("_")}
    if isinstance(result, float) and not math.isfinite(result):
        return None
    if isinstance(result, list):
        return [public(v) for v in result]
    return result


def format_table(result: dict, n_column: str, loss_column: str) -> str:
    """The printed summary of ``public(analyze(...))``: each parameter with its 95% interval."""
    def num(v, fmt):
        return "n/a" if v is None or not math.isfinite(v) else format(v, fmt)

    def ci(e, fmt):
        lo, hi = e["ci95"]
        return f"{num(e['value'], fmt)}  [{num(lo, fmt)}, {num(hi, fmt)}]"

    pl = result["power_law"]
    lines = [f"L(N) = (N_c/N)^α   N = {n_column}, L = {loss_column}, {pl['num_points']} points ({pl['points']})",
             f"  α     {ci(pl['alpha'], '.4f')}   (95% bootstrap interval; Kaplan α_N = {KAPLAN_ALPHA_N})",
             f"  N_c   {ci(pl['N_c'], '.3g')}"]
    ch = result["chinchilla"]
    if ch:
        lines.append(f"L(N,D) = E + A/N^α + B/D^β   {ch['num_points']} runs, Huber δ={ch['huber_delta']}")
        for p, fmt in (("E", ".4f"), ("A", ".4g"), ("B", ".4g"), ("alpha", ".4f"), ("beta", ".4f")):
            lines.append(f"  {p:<5} {ci(ch[p], fmt)}")
        lines.append(f"  N_opt ∝ C^a from the fit: a = {ci(ch['n_opt_exponent'], '.3f')}")
    elif "chinchilla_skipped" in result:
        lines.append(f"L(N,D): not fitted ({result['chinchilla_skipped']})")
    fr = result["frontier"]
    if fr:
        a = fr["n_opt_exponent"]
        lines.append(f"compute-optimal frontier: {len(fr['runs'])} runs; N_opt ∝ C^a through them: "
                     f"{'a = %.3f' % a if a is not None else 'a: needs 2 frontier runs of different sizes'}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg: no display needed).


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_power_law(result: dict, runs: Runs, path: str, n_label: str, loss_label: str) -> str:
    """Data, the fitted line with its 95% bootstrap band, and Kaplan's α_N slope through the fit's midpoint."""
    plt = _pyplot()
    pl = result["power_law"]
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    if runs.tokens_vary:
        sc = ax.scatter(runs.n, runs.loss, c=np.log10(runs.d), cmap="viridis", s=28, zorder=3, label="runs")
        fig.colorbar(sc, ax=ax, label="log10 tokens")
        ax.scatter(pl["_runs"].n, pl["_runs"].loss, facecolors="none", edgecolors="C1", s=80, zorder=4,
                   label="fitted: lowest loss per size")
    else:
        ax.scatter(runs.n, runs.loss, s=28, zorder=3, label="runs")
    grid = np.geomspace(runs.n.min() / 1.5, runs.n.max() * 1.5, 100)
    alpha, log_n_c = pl["alpha"]["value"], pl["log_N_c"]["value"]
    if pl["_samples"]:
        curves = np.array([power_law_loss(grid, s["alpha"], s["log_n_c"]) for s in pl["_samples"]])
        lo, hi = np.percentile(curves, CI_PERCENTILES, axis=0)
        ax.fill_between(grid, lo, hi, color="C1", alpha=0.25, label="95% bootstrap band")
    lo_a, hi_a = pl["alpha"]["ci95"]
    ax.plot(grid, power_law_loss(grid, alpha, log_n_c), color="C1",
            label=f"fit: α = {alpha:.3f} [{lo_a:.3f}, {hi_a:.3f}]")
    mid = math.exp(np.log(pl["_runs"].n).mean())
    ax.plot(grid, power_law_loss(mid, alpha, log_n_c) * (grid / mid) ** -KAPLAN_ALPHA_N, "k--", lw=1,
            label=f"Kaplan slope α_N = {KAPLAN_ALPHA_N}")
    ax.set(xscale="log", yscale="log", xlabel=n_label, ylabel=loss_label, title="L(N) = (N_c / N)^α")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_chinchilla(result: dict, runs: Runs, path: str, n_label: str, loss_label: str) -> str:
    """Loss against N for each token budget, with the fitted L(N, D) at that budget."""
    plt = _pyplot()
    fit = result["chinchilla"]["_fit"]
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    budgets = np.unique(runs.d)
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(budgets)))
    grid = np.geomspace(runs.n.min() / 1.5, runs.n.max() * 1.5, 100)
    for d, colour in zip(budgets, colours):
        mask = runs.d == d
        ax.scatter(runs.n[mask], runs.loss[mask], color=colour, s=24, zorder=3)
        ax.plot(grid, chinchilla_loss(grid, d, fit), color=colour, lw=1, label=f"D = {d:.3g}")
    ax.axhline(fit["E"], color="gray", ls=":", label=f"E = {fit['E']:.3f}")
    ax.set(xscale="log", yscale="log", xlabel=n_label, ylabel=loss_label,
           title=f"E + A/N^α + B/D^β: α = {fit['alpha']:.3f}, β = {fit['beta']:.3f}")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_frontier(result: dict, runs: Runs, path: str, n_label: str, loss_label: str) -> str:
    """Left: loss against FLOPs with the frontier. Right: frontier N against C with the fitted N_opt(C)."""
    plt = _pyplot()
    fr = result["frontier"]
    idx = [runs.names.index(name) for name in fr["runs"]]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.5))
    ax.scatter(runs.flops, runs.loss, c=np.log10(runs.n), cmap="viridis", s=22, label="runs")
    ax.plot(runs.flops[idx], runs.loss[idx], "r-o", ms=4, lw=1, label="frontier (lowest loss so far)")
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs", ylabel=loss_label, title="compute frontier")
    ax.legend(fontsize=8)
    bx.scatter(runs.flops[idx], runs.n[idx], color="r", s=24, zorder=3, label="frontier runs")
    grid = np.geomspace(runs.flops.min(), runs.flops.max(), 50)
    if fr["_fit"]:
        bx.plot(grid, np.exp(fr["_fit"]["log_k"]) * grid ** fr["_fit"]["a"], "r-", lw=1,
                label=f"frontier fit: a = {fr['_fit']['a']:.3f}")
    ch = result["chinchilla"]
    if ch and math.isfinite(ch["n_opt_exponent"]["value"]):
        alloc = optimal_allocation(ch["_fit"], ch["flops_per_param_token"])
        bx.plot(grid, alloc["G"] * (grid / alloc["k"]) ** alloc["a"], "k--", lw=1,
                label=f"from L(N,D) fit: a = {alloc['a']:.3f}")
    bx.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel=n_label, title="N_opt(C) ∝ C^a")
    bx.legend(fontsize=8)
    for axis in (ax, bx):
        axis.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
