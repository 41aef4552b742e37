"""The over-optimisation study: its formulas and a smoke run on the smoke pipeline.

References: the fits recover α, β from synthetic data generated with them (noiseless: exactly; with noise: within
4 standard errors and 0.05); KL(BoN ‖ π) = log N − (N−1)/N against the exact KL of best-of-N over a fine uniform
base distribution; the best-of-n estimator against brute force over every n-subset (ties included); the smoke
study's numbers against the gold oracle re-applied to its saved answers, evaluation.reward_accuracy (a second
implementation of the RM accuracy) and the PPO runs' own checkpoints.
"""

import itertools
import json
import math
import os

import numpy as np
import pytest

from configs import overopt as overopt_config
from gptjax.errors import ConfigError
from gptjax.model import ScoreModel
from gptjax.seed_world import evaluation, labeler, overopt
from gptjax.tools import analysis
from gptjax.train import checkpoint as ckpt_lib


# --- formulas ------------------------------------------------------------------------------------------------

def test_bon_kl_matches_the_exact_kl_of_best_of_n_over_a_fine_uniform_base():
    M = 200_000  # base policy: uniform over M outcomes with distinct rewards (the continuous limit)
    i = np.arange(1, M + 1, dtype=np.float64)
    for n in (1, 2, 4, 16, 256):
        p = (i / M) ** n - ((i - 1) / M) ** n  # P(best of n draws is the i-th smallest)
        kl = float(np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0) * M), 0.0)))
        assert overopt.bon_kl(n) == pytest.approx(kl, abs=2e-3), n
    assert overopt.bon_kl(1) == 0.0
    assert overopt.bon_kl(256) == pytest.approx(math.log(256) - 255 / 256)
    with pytest.raises(ValueError, match="n >= 1"):
        overopt.bon_kl(0)


def _brute_force_bon(values, proxy, n):
    """Mean over every n-subset of the value the proxy picks (ties: the tied samples' mean)."""
    picks = []
    for subset in itertools.combinations(range(len(values)), n):
        top = max(proxy[j] for j in subset)
        picks.append(np.mean([values[j] for j in subset if proxy[j] == top]))
    return float(np.mean(picks))


def test_bon_expectation_equals_brute_force_over_all_subsets():
    rng = np.random.default_rng(0)
    values = rng.normal(size=8)
    proxy = rng.integers(0, 4, size=8).astype(float)  # few levels: many ties
    for n in range(1, 9):
        assert overopt.bon_expectation(values, proxy, n) == pytest.approx(_brute_force_bon(values, proxy, n), abs=1e-12)
    distinct = rng.normal(size=7)
    assert overopt.bon_expectation(values[:7], distinct, 1) == pytest.approx(values[:7].mean())
    assert overopt.bon_expectation(values[:7], distinct, 7) == pytest.approx(values[np.argmax(distinct)])
    with pytest.raises(ValueError, match="1 <= n <= the 7 samples"):
        overopt.bon_expectation(values[:7], distinct, 8)


@pytest.mark.parametrize("form", ["bon", "rl"])
def test_fits_recover_known_parameters(form):
    fit, curve = (overopt.fit_bon, overopt.bon_curve) if form == "bon" else (overopt.fit_rl, overopt.rl_curve)
    truth = {"alpha": 1.2, "beta": 0.3} if form == "bon" else {"alpha": 1.5, "beta": 0.4}
    d = np.linspace(0.0, 4.0, 25)
    exact = fit(d, curve(d, truth))
    assert exact["alpha"] == pytest.approx(truth["alpha"], abs=1e-9)
    assert exact["beta"] == pytest.approx(truth["beta"], abs=1e-9)
    # Noise of the size of the study's evaluation noise (0.03 labeler points).
    r = curve(d, truth) + np.random.default_rng(1).normal(0, 0.03, size=d.shape)
    noisy = fit(d, r)
    for k in ("alpha", "beta"):
        assert abs(noisy[k] - truth[k]) < min(4 * noisy[f"{k}_se"], 0.05), (k, noisy)
    assert noisy["num_points"] == 25 and noisy["rmse"] < 0.05
    # The two forms are not interchangeable: data from one is fitted worse by the other.
    other = overopt.fit_rl if form == "bon" else overopt.fit_bon
    assert other(d, curve(d, truth))["rmse"] > 1e-3


def test_fit_rejects_unusable_points():
    with pytest.raises(ValueError, match="at least 2 points with d > 0"):
        overopt.fit_bon([0.0, 0.0, 1.0], [0.0, 0.1, 0.2])
    with pytest.raises(ValueError, match="same length"):
        overopt.fit_rl([0.5, 1.0], [0.1])
    with pytest.raises(ValueError, match="finite"):
        overopt.fit_rl([0.5, 1.0, float("nan")], [0.1, 0.2, 0.3])


def test_proxy_specs_parse_and_bad_ones_name_the_format():
    assert overopt.parse_proxies("S:1x32x2, L:4x128x4") == [overopt.ProxySpec("S", 1, 32, 2),
                                                             overopt.ProxySpec("L", 4, 128, 4)]
    with pytest.raises(ConfigError, match="name:LAYERSxD_MODELxHEADS"):
        overopt.parse_proxies("S:1x32")
    with pytest.raises(ConfigError, match="do not divide"):
        overopt.parse_proxies("S:1x30x4")
    with pytest.raises(ConfigError, match="distinct"):
        overopt.parse_proxies("S:1x32x2,S:2x64x2")


# --- the smoke study ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_smoke_study_end_to_end(smoke_pipeline, tmp_path):
    cfg = overopt_config.get_config("smoke")
    out = str(tmp_path / "overopt")
    results = overopt.run_study(cfg, smoke_pipeline, out)
    for name in ("overopt.json", "overopt.md", "overopt.png", overopt.BON_FILE):
        assert os.path.exists(os.path.join(out, name)), name
    assert set(results["proxies"]) == {"S", "M"}

    # Proxy M has the pipeline's size: it reuses the pipeline's pretraining run; S pretrained its own decoder.
    assert not os.path.exists(os.path.join(out, "proxies", "M", "pretrain"))
    s_cfg = ckpt_lib.checkpoint_config(os.path.join(out, "proxies", "S", "reward"))
    assert (s_cfg["model"]["num_layers"], s_cfg["model"]["d_model"]) == (1, 16)
    assert s_cfg["train"]["init_from"] == os.path.join(out, "proxies", "S", "pretrain")

    # RM held-out accuracy against the pipeline's own implementation.
    labels_eval = os.path.join(smoke_pipeline, "labels", "rankings_eval.jsonl")
    for name in ("S", "M"):
        rm_dir = os.path.join(out, "proxies", name, "reward")
        run = analysis.open_run(rm_dir)
        params = run.load(run.components[0])
        expected = evaluation.reward_accuracy(run.components[0].model, params, labels_eval, run.tokenizer,
                                            int(run.config.train.seq_len))
        assert results["proxies"][name]["heldout_pairwise_accuracy"] == pytest.approx(expected, abs=1e-9)

    # Best-of-N: gold scores re-derived from the saved answers; N = 1 is the plain SFT mean.
    bon = results["best_of_n"]
    assert bon["n"] == [1, 2, 4, 8] and bon["kl"] == pytest.approx(list(overopt.bon_kl([1, 2, 4, 8])))
    oracle = labeler.GoldOracle()
    with open(os.path.join(out, "bon_samples.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == cfg.bon.num_prompts * cfg.bon.samples_per_prompt
    with open(os.path.join(smoke_pipeline, "world", "heldout.jsonl"), encoding="utf-8") as f:
        heldout = {q.text: q for q in map(labeler.Question.from_record, map(json.loads, f))}
    for r in rows:
        assert r["gold"] == oracle.score(heldout[r["question"]], r["answer"])
    gold_PS = np.array([r["gold"] for r in rows]).reshape(cfg.bon.num_prompts, cfg.bon.samples_per_prompt)
    proxy_PS = np.array([r["S"] for r in rows]).reshape(gold_PS.shape)
    assert bon["proxies"]["S"]["gold"][0] == pytest.approx(gold_PS.mean())
    expected_best = np.mean([g[np.argmax(p)] if np.sum(p == p.max()) == 1 else g[p == p.max()].mean()
                             for g, p in zip(gold_PS, proxy_PS)])
    assert bon["proxies"]["S"]["gold"][-1] == pytest.approx(expected_best)
    assert all(a <= b + 1e-9 for a, b in zip(bon["proxies"]["S"]["proxy"], bon["proxies"]["S"]["proxy"][1:]))

    # PPO: evaluations at steps 0, 1, 2; the step-0 policy is the SFT policy itself (KL exactly 0); the value model
    # has the proxy's size.
    for name, d_model in (("S", 16), ("M", 32)):
        evals = results["rl"][name]["evals"]
        assert [e["step"] for e in evals] == [0, 1, 2]
        assert evals[0]["kl"] == 0.0
        assert all(np.isfinite([e["gold"], e["proxy"], e["kl"]]).all() for e in evals)
        ppo_run = analysis.open_run(os.path.join(out, "ppo", name))
        assert ppo_run.steps[-1] == 2
        value = ppo_run.component("value").model
        assert isinstance(value, ScoreModel) and value.cfg.d_model == d_model
    # A finished run is reused only under the same config; another config there is an error.
    o = overopt.ppo_config(smoke_pipeline, os.path.join(out, "proxies", "S", "reward"), cfg.rl)
    assert overopt.run_finished(os.path.join(out, "ppo", "S"), o, 2)
    o.optim.lr = 0.5
    with pytest.raises(ConfigError, match="different config"):
        overopt.run_finished(os.path.join(out, "ppo", "S"), o, 2)
    table = overopt.format_table(results)
    assert "| S | 1 × 16 |" in table and "| M | 2 × 32 |" in table
