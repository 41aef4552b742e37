"""Checkpoint analysis on tiny runs of every stage (the smoke pipeline's pretrain, SFT, RM and PPO runs, plus a
2-checkpoint pretraining run for update norms).

References: parameter counts against model.count_params of the config the trainer recorded (run_info.json) and
against the raw checkpoint's array sizes; weight/update norms and checkpoint differences against numpy norms of the
arrays orbax restores without our loaders; the LM loss against a plain forward pass + log-softmax; greedy samples
against a KV-cache-free argmax decoder; RM accuracy against evaluation.reward_accuracy and answer scores against
ScoreModel.reward with the stored bias; the KL against the sampler's own log-probs minus a plain reference forward.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import overopt as overopt_config
from gptjax import sampling
from gptjax.data import chat, post_training
from gptjax.data.pipeline import make_lm_iterator
from gptjax.errors import ConfigError, DataFormatError
from gptjax.model import GPT, GPTConfig, ScoreModel, count_params
from gptjax.seed_world import evaluation, overopt
from gptjax.stages import common, registry, reward
from gptjax.stages import rollouts as rollouts_lib
from gptjax.stages.reward import shift_reward_bias
from gptjax.tools import analysis
from gptjax.train import checkpoint as ckpt_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def two_checkpoints(smoke_pipeline, tmp_path_factory):
    """A 2-layer scanned pretraining run on the pipeline's corpus with checkpoints at steps 2 and 4."""
    p = overopt.stored_config(os.path.join(smoke_pipeline, "pretrain"))
    p.model.num_layers, p.model.d_model, p.model.num_heads, p.model.scan_layers = 2, 16, 2, True
    p.train.steps, p.train.ckpt_every, p.train.eval_every, p.train.eval_batches = 4, 2, 0, 2
    p.train.sample_prompts = ()
    workdir = str(tmp_path_factory.mktemp("two_ckpts"))
    registry.get("pretrain").run(p, workdir)
    return workdir


def _raw(workdir, step, key="params"):
    """The checkpoint's arrays as orbax restores them, bypassing gptjax's loaders."""
    restored = ocp.PyTreeCheckpointer().restore(os.path.join(workdir, "checkpoints", str(step), "state"))
    return jax.tree.map(np.asarray, jax.device_get(restored[key]))


def _norm(*arrays):
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(a, np.float64))) for a in arrays)))


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


# --- errors (no runs needed) ---------------------------------------------------------------------------------

def test_workdir_without_checkpoints_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="holds no finished checkpoint"):
        analysis.open_run(str(tmp_path))
    with pytest.raises(ConfigError, match="does not exist"):
        analysis.open_run(str(tmp_path / "missing"))
    (tmp_path / "checkpoints" / "7.orbax-checkpoint-tmp-1").mkdir(parents=True)  # an interrupted save only
    with pytest.raises(ConfigError, match="holds no finished checkpoint"):
        analysis.open_run(str(tmp_path))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "experiments.analyze", f"--workdir={tmp_path}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --workdir=") and "holds no finished checkpoint" in last
    assert "Traceback" not in proc.stderr


def test_layer_naming_and_difference_on_handmade_trees():
    # Scanned layout: groups/<block>/… with a leading axis of num_groups; two blocks per group (dense, local).
    scanned = {"decoder": {"wte": {"embedding": np.ones((4, 2))},
                           "groups": {"block_0": {"mlp": {"fc": {"kernel": np.arange(6.0).reshape(3, 2, 1)}}},
                                      "block_1": {"mlp": {"fc": {"kernel": -np.ones((3, 2, 1))}}}}},
               "score": {"kernel": np.ones((2, 1)), "bias": np.zeros(1)}}
    leaves = analysis.layer_leaves(scanned)
    assert sorted(leaves) == ["layer_0/mlp/fc/kernel", "layer_1/mlp/fc/kernel", "layer_2/mlp/fc/kernel",
                              "layer_3/mlp/fc/kernel", "layer_4/mlp/fc/kernel", "layer_5/mlp/fc/kernel",
                              "score/bias", "score/kernel", "wte/embedding"]
    np.testing.assert_array_equal(leaves["layer_2/mlp/fc/kernel"], [[2.0], [3.0]])  # group 1, block 0
    counts = analysis.param_counts(leaves)
    assert counts == {"total": 8 + 12 + 3, "layers": 6, "by_module_type": {"wte": 8, "mlp/fc": 12, "score": 3}}
    assert analysis.module_norms(leaves)["score"] == pytest.approx(np.sqrt(2.0))
    other = {**leaves, "layer_2/mlp/fc/kernel": np.zeros((2, 1)), "extra/kernel": np.ones(1)}
    diff = analysis.difference(leaves, other)
    assert diff["modules"]["layer_2/mlp/fc"]["diff"] == pytest.approx(np.sqrt(13.0))
    assert diff["modules"]["layer_0/mlp/fc"]["relative"] == 0.0
    assert diff["only_in_second"] == ["extra/kernel"]
    with pytest.raises(ConfigError, match="nothing to compare"):
        analysis.difference({"a/kernel": np.ones(2)}, {"a/kernel": np.ones(3)})


# --- runs of every stage --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_pretrain_report_through_the_binary(two_checkpoints, tmp_path):
    out = tmp_path / "report"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "experiments.analyze", f"--workdir={two_checkpoints}",
                           f"--out={out}", "--max_new_tokens=8", "--eval_batches=2"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "analysis.json").read_text())
    report = (out / "report.md").read_text()
    for png in ("param_counts.png", "weight_norms.png", "update_norms.png"):
        assert (out / png).stat().st_size > 1000, png
    assert result["stage"] == "pretrain" and result["step"] == 4 and result["steps"] == [2, 4]

    with open(os.path.join(two_checkpoints, "run_info.json")) as f:
        gpt_cfg = GPTConfig(**json.load(f)["model"])  # what the trainer built, as it recorded it
    comp = result["components"]["model"]
    assert comp["counts"]["total"] == count_params(gpt_cfg)["total"] == comp["expected_counts"]["total"]
    assert comp["counts"]["layers"] == 2
    assert f"Total **{comp['counts']['total']:,}**" in report

    new, old = _raw(two_checkpoints, 4), _raw(two_checkpoints, 2)
    qkv = new["decoder"]["groups"]["block_0"]["attn"]["qkv"]  # scanned: leading axis = layer
    assert comp["weight_norms"]["layer_1/attn/qkv"] == pytest.approx(_norm(qkv["kernel"][1], qkv["bias"][1]), rel=1e-6)
    assert comp["weight_norms"]["wte"] == pytest.approx(_norm(new["decoder"]["wte"]["embedding"]), rel=1e-6)
    fc_new, fc_old = new["decoder"]["groups"]["block_0"]["mlp"]["fc"], old["decoder"]["groups"]["block_0"]["mlp"]["fc"]
    update = comp["update"]
    assert update["from_step"] == 2
    expected = _norm(fc_new["kernel"][0] - fc_old["kernel"][0], fc_new["bias"][0] - fc_old["bias"][0]) / _norm(
        fc_old["kernel"][0], fc_old["bias"][0])
    assert update["modules"]["layer_0/mlp/fc"]["relative"] == pytest.approx(expected, rel=1e-6)
    all_new, all_old = _leaves(new), _leaves(old)
    assert update["total"]["relative"] == pytest.approx(
        _norm(*[a - b for a, b in zip(all_new, all_old)]) / _norm(*all_old), rel=1e-6)

    # Loss on the validation split: a plain forward + log-softmax over the same two batches.
    stored = overopt.stored_config(two_checkpoints)
    tok = common.build_tokenizer(stored.tokenizer)
    it = make_lm_iterator(stored.data, tok, split="validation", global_batch_size=int(stored.train.batch_size),
                          seq_len=int(stored.train.seq_len), seed=int(stored.train.seed), num_epochs=1)
    params = jax.tree.map(jnp.asarray, new)
    nll_sum = weight = 0.0
    for _ in range(2):
        b = next(it)
        logits, _ = GPT(gpt_cfg).apply({"params": params}, b["inputs"], b["positions"], b["segment_ids"])
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -np.take_along_axis(np.asarray(logp), b["targets"][..., None], axis=-1)[..., 0]
        nll_sum, weight = nll_sum + float(np.sum(nll * b["weights"])), weight + float(np.sum(b["weights"]))
    assert result["loss"]["loss"] == pytest.approx(nll_sum / weight, rel=1e-4)
    assert result["loss"]["num_batches"] == 2

    # Greedy samples (the run's own sample prompts, raw text after EOS) against an argmax decoder without a cache.
    for s in result["samples"]:
        ids = [tok.eos_id, *tok.encode(s["prompt"])]
        new_ids = []
        for _ in range(8):
            logits, _ = GPT(gpt_cfg).apply({"params": params}, jnp.asarray([ids + new_ids]))
            nxt = int(np.argmax(np.asarray(logits[0, -1, :tok.vocab_size])))
            new_ids.append(nxt)
            if nxt == tok.eos_id:
                break
        assert s["response"] == tok.decode(new_ids)


@pytest.mark.slow
def test_sft_report_and_comparison_with_pretraining(smoke_pipeline, tmp_path):
    sft_dir, pre_dir = os.path.join(smoke_pipeline, "sft"), os.path.join(smoke_pipeline, "pretrain")
    result = analysis.analyze(sft_dir, analysis.Options(compare=pre_dir, max_new_tokens=4, eval_batches=1))
    paths = analysis.write_report(result, str(tmp_path))
    assert os.path.join(str(tmp_path), "compare.png") in paths
    assert result["stage"] == "sft" and "update" not in result["components"]["model"]  # one checkpoint kept
    sft, pre = _raw(sft_dir, result["step"]), _raw(pre_dir, result["compare"]["other_step"])
    a, b = _leaves(sft), _leaves(pre)
    assert result["compare"]["total"]["relative"] == pytest.approx(
        _norm(*[x - y for x, y in zip(a, b)]) / _norm(*b), rel=1e-6)
    ln = sft["decoder"]["groups_1"]["block_0"]["ln_2"]  # unscanned layout: groups_<i>
    ln_pre = pre["decoder"]["groups_1"]["block_0"]["ln_2"]
    assert result["compare"]["modules"]["layer_1/ln_2"]["diff"] == pytest.approx(
        _norm(ln["scale"] - ln_pre["scale"], ln["bias"] - ln_pre["bias"]), rel=1e-6)
    assert result["loss"]["split"] == "eval" and result["loss"]["source"].endswith("sft_eval.jsonl")
    assert 0 < result["loss"]["loss"] < 10
    assert [s["prompt"] for s in result["samples"]] == list(analysis.DEFAULT_CHAT_PROMPTS)
    with pytest.raises(ConfigError, match="choose one of"):
        analysis.analyze(sft_dir, analysis.Options(split="validation"))


@pytest.mark.slow
def test_reward_report_scores_answers_like_the_reward_model(smoke_pipeline, tmp_path):
    rm_dir = os.path.join(smoke_pipeline, "reward")
    answers = tmp_path / "answers.jsonl"
    answers.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in (
        {"prompt": "Is 27 a prime number?", "response": "No — 27 is divisible by 3."},
        {"prompt": "27 是不是質數？",
         "responses": ["27 是質數。", "27 不是質數，因為它可以被 3 整除。"]})) + "\n")
    result = analysis.analyze(rm_dir, analysis.Options(answers_file=str(answers)))
    analysis.write_report(result, str(tmp_path / "report"))
    assert result["stage"] == "reward" and "samples" not in result

    run = analysis.open_run(rm_dir)
    model = run.components[0].model
    raw = _raw(rm_dir, result["step"])
    assert result["components"]["model"]["counts"]["total"] == sum(x.size for x in _leaves(raw))
    assert result["components"]["model"]["counts"]["total"] == count_params(model.cfg)["total"] + model.cfg.d_model + 1
    params = jax.tree.map(jnp.asarray, raw)
    labels_eval = os.path.join(smoke_pipeline, "labels", "rankings_eval.jsonl")
    assert result["loss"]["pairwise_accuracy"] == pytest.approx(
        evaluation.reward_accuracy(model, params, labels_eval, run.tokenizer, int(run.config.train.seq_len)), abs=1e-9)

    with open(os.path.join(rm_dir, reward.REWARD_BIAS_FILE)) as f:
        shift = json.load(f)["shift"]
    scores = result["answer_scores"]
    assert scores["centred"] and scores["bias_shift"] == pytest.approx(shift)
    assert len(scores["scores"]) == 3
    centred = shift_reward_bias(params, shift)
    tok = run.tokenizer
    questions = ("Is 27 a prime number?", "27 是不是質數？", "27 是不是質數？")
    for s, conv_text in zip(scores["scores"], questions):
        row = np.concatenate([chat.render_prompt(chat.user_turn(conv_text), tok),
                              chat.render_response(s["response"], tok)])
        expected = model.apply({"params": centred}, jnp.asarray(row[None]), jnp.ones((1, len(row)), bool),
                               method=ScoreModel.reward)
        assert s["score"] == pytest.approx(float(expected[0]), abs=1e-4)
    answers.write_text(json.dumps({"prompt": "Is 27 prime?"}) + "\n")
    with pytest.raises(DataFormatError, match="answers.jsonl:1"):
        post_training.read_answers(str(answers))


@pytest.mark.slow
def test_ppo_report_policy_value_and_kl(smoke_pipeline, tmp_path):
    ppo_dir, sft_dir = os.path.join(smoke_pipeline, "ppo"), os.path.join(smoke_pipeline, "sft")
    result = analysis.analyze(ppo_dir, analysis.Options(kl_num_prompts=8, max_new_tokens=4, eval_batches=1))
    analysis.write_report(result, str(tmp_path))
    assert set(result["components"]) == {"policy", "value"}
    raw_value = _raw(ppo_dir, result["step"], "value_params")
    assert result["components"]["value"]["counts"]["total"] == sum(x.size for x in _leaves(raw_value))
    raw_policy = _raw(ppo_dir, result["step"], "policy_params")
    assert result["components"]["policy"]["counts"]["total"] == sum(x.size for x in _leaves(raw_policy))
    assert result["kl"]["reference"] == sft_dir and result["kl"]["num_samples"] == 8
    assert np.isfinite(result["kl"]["kl_mean"]) and "KL(policy ‖ reference)" in (tmp_path / "report.md").read_text()

    # The KL estimator: Σ (sampler log π − plain-forward log π_ref) over each sampled response.
    run = analysis.open_run(ppo_dir)
    policy = run.components[0].model
    ppo_params = jax.tree.map(jnp.asarray, raw_policy)
    sft_params = jax.tree.map(jnp.asarray, _raw(sft_dir, ckpt_lib.finished_steps(sft_dir)[-1]))
    tok = run.tokenizer
    cfg = sampling.SamplingConfig(max_new_tokens=8, temperature=1.0, eos_id=tok.eos_id, pad_id=tok.pad_id,
                                  vocab_size=tok.vocab_size)
    engine = rollouts_lib.RolloutEngine(policy, cfg, batch_size=4)
    prompts = [chat.render_prompt(chat.user_turn(q), tok).tolist() for q in ("Is 27 prime?", "13 是質數嗎？")]
    rollouts = engine.generate(ppo_params, prompts, seed=3)
    kl = engine.kl(ppo_params, sft_params, rollouts)
    for i in range(len(prompts)):
        t, v, m = rollouts.tokens_BT[i], rollouts.valid_BT[i], rollouts.response_mask_BT[i]
        real = t[v]  # the row without padding: prompt then response
        logits, _ = policy.apply({"params": sft_params}, jnp.asarray(real[None]))
        logits = np.where(np.arange(logits.shape[-1]) < tok.vocab_size, np.asarray(logits[0]), -np.inf)
        logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))  # the sampled distribution: padded ids excluded
        resp = np.nonzero(m[v])[0]
        ref = sum(logp[j - 1, real[j]] for j in resp)
        assert kl[i] == pytest.approx(float(np.sum(rollouts.sampler_logprobs_BN[i])) - ref, abs=2e-3)
    np.testing.assert_allclose(engine.kl(sft_params, sft_params, rollouts), 0.0, atol=1e-6)
