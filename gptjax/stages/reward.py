"""Stage 2, the reward model: the K-wise ranking loss of InstructGPT (Ouyang et al. 2022, §3.5 eq. 1).

A batch element is one prompt with K responses ranked best → worst (``gptjax.data.batches.RANKING_BATCH``:
``tokens``/``valid`` (B, K, T), ``num_ranked`` (B,)). All C(n, 2) pairs of an element's n ranked responses enter
its loss together:

    loss(x) = −1/C(n, 2) · Σ_{i<j<n} log σ(r(x, y_i) − r(x, y_j))

and the batch loss is the mean over rankings, so every prompt weighs the same however many pairs it has. With
``data.pack``, several short rankings share an element (``group`` (B, K) tells them apart; pairs never cross
rankings). The K responses take K forward passes (one batched call over B·K rows), not C(K, 2). The scalar
reward is read at each response's last valid (EOS) token by ``ScoreModel.reward``.

After training, ``fit_reward_bias`` shifts the score head's bias so the SFT demonstrations score mean 0, as
InstructGPT does before RL (the PPO reward then starts centred).

The stage (registered at the end): a ScoreModel on the ``train.init_from`` run's decoder, trained by the shared
loop on JSONL rankings, then centred on ``data.demos_path``; analysis scores given answers with it.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import flops, paths, sharding
from gptjax.data import batches, chat, post_training
from gptjax.errors import ConfigError
from gptjax.model import ScoreModel
from gptjax.stages import common, registry
from gptjax.stages.rl import positions_and_segments
from gptjax.tokenizers import Tokenizer
from gptjax.train import loop

REWARD_BIAS_FILE = "reward_bias.json"  # in the run's workdir: the demonstration-centring shift and its step

Array = jax.Array

def ranked_pairs_BKK(num_ranked_B, K: int, group_BK=None) -> Array:
    """pairs[b, i, j]: response i is ranked above response j, both among the first num_ranked[b] and (with
    ``group_BK``, several rankings packed in one element) of the same ranking."""
    i_K1, j_1K = jnp.arange(K)[:, None], jnp.arange(K)[None, :]
    pairs_BKK = (i_K1 < j_1K)[None] & (j_1K[None] < num_ranked_B[:, None, None])
    if group_BK is not None:
        pairs_BKK = pairs_BKK & (group_BK[:, :, None] == group_BK[:, None, :])
    return pairs_BKK


def ranking_loss(scores_BK, num_ranked_B, group_BK=None) -> Array:
    """Mean over the batch's rankings of each ranking's mean −log σ(s_i − s_j) over its ranked pairs i above j.
    Elements without a pair (padding) are not counted; packed elements count each of their rankings."""
    K = scores_BK.shape[1]
    if K < 2:
        raise ValueError(f"ranking_loss: need K >= 2 responses per prompt, got scores of shape {scores_BK.shape}")
    pairs_BKK = ranked_pairs_BKK(num_ranked_B, K, group_BK)
    margins_BKK = scores_BK[:, :, None] - scores_BK[:, None, :]
    # A response of a ranking of n has n - 1 partners and its ranking n(n-1)/2 pairs; weighing each pair by the
    # inverse makes every ranking's weights sum to 1, so the weights' total counts the rankings.
    partners_BK = jnp.sum(pairs_BKK | jnp.swapaxes(pairs_BKK, 1, 2), axis=2).astype(jnp.float32)
    num_pairs_BK = partners_BK * (partners_BK + 1) / 2
    weight_BKK = jnp.where(pairs_BKK, 1.0 / jnp.maximum(num_pairs_BK, 1.0)[:, :, None], 0.0)
    nll = -jnp.sum(weight_BKK * jnp.where(pairs_BKK, jax.nn.log_sigmoid(margins_BKK), 0.0))
    return nll / jnp.maximum(jnp.sum(weight_BKK), 1.0)


def pairwise_accuracy(scores_BK, num_ranked_B, group_BK=None) -> Array:
    """Fraction of all ranked pairs in the batch whose better response scores strictly higher."""
    pairs_BKK = ranked_pairs_BKK(num_ranked_B, scores_BK.shape[1], group_BK)
    correct_BKK = scores_BK[:, :, None] > scores_BK[:, None, :]
    return jnp.sum(pairs_BKK & correct_BKK) / jnp.maximum(jnp.sum(pairs_BKK), 1)


def sequence_rewards(params, tokens_BT, valid_BT, *, model: ScoreModel, rng=None,
                     deterministic: bool = True) -> Array:
    """Reward of each row (B,), read at its last valid token; padding side does not matter."""
    positions_BT, segment_ids_BT = positions_and_segments(valid_BT)
    rngs = None if deterministic or rng is None else {"dropout": rng}
    return model.apply({"params": params}, tokens_BT, valid_BT, positions_BT, segment_ids_BT,
                       deterministic=deterministic, rngs=rngs, method=ScoreModel.reward)


def reward_loss(params, batch, rng, *, model: ScoreModel,
                deterministic: bool = False) -> tuple[Array, dict[str, Array]]:
    """K-wise ranking loss of a ranking batch, and metrics.

    Metrics: ``loss``, ``accuracy`` (pairwise, over all ranked pairs), ``reward_mean``/``reward_std`` (over the
    ranked responses), ``num_pairs``. Unused slots (k >= num_ranked) are computed but never counted.
    """
    batches.check(batch, batches.RANKING_BATCH, "reward_loss")
    tokens_BKT, valid_BKT, num_ranked_B = batch["tokens"], batch["valid"], batch["num_ranked"]
    group_BK = batch.get("group")
    B, K, T = tokens_BKT.shape
    rewards_B_K = sequence_rewards(params, tokens_BKT.reshape(B * K, T), valid_BKT.reshape(B * K, T),
                                   model=model, rng=rng, deterministic=deterministic)
    scores_BK = rewards_B_K.reshape(B, K)
    loss = ranking_loss(scores_BK, num_ranked_B, group_BK)
    ranked_BK = jnp.arange(K)[None, :] < num_ranked_B[:, None]
    num_ranked = jnp.maximum(jnp.sum(ranked_BK), 1)
    mean = jnp.sum(jnp.where(ranked_BK, scores_BK, 0.0)) / num_ranked
    var = jnp.sum(jnp.where(ranked_BK, jnp.square(scores_BK - mean), 0.0)) / num_ranked
    metrics = {"loss": loss, "accuracy": pairwise_accuracy(scores_BK, num_ranked_B, group_BK), "reward_mean": mean,
               "reward_std": jnp.sqrt(var), "num_pairs": jnp.sum(ranked_pairs_BKK(num_ranked_B, K, group_BK))}
    return loss, metrics


def shift_reward_bias(params, shift) -> dict:
    """``params`` with the score head's bias lowered by ``shift`` (every reward moves by −shift)."""
    if "score" not in params or "bias" not in params["score"]:
        raise KeyError(f"shift_reward_bias: params have no score-head bias (top-level keys {sorted(params)}); "
                       f"pass the parameters of a ScoreModel (reward model)")
    score = dict(params["score"])
    score["bias"] = score["bias"] - jnp.asarray(shift, score["bias"].dtype)
    return {**params, "score": score}


def fit_reward_bias(params, demonstrations: Iterable[Mapping[str, np.ndarray]], *,
                    model: ScoreModel) -> tuple[dict, float]:
    """Shift the score bias so the demonstrations' mean reward is 0; returns (new params, the shift).

    ``demonstrations`` yields dicts with ``tokens`` and ``valid`` (N, T): one conversation per row (prompt + the
    SFT demonstration, ending in EOS), either padding side. The shift is exact: rewards are linear in the bias.
    """
    rewards_fn = jax.jit(lambda p, t, v: sequence_rewards(p, t, v, model=model))
    total, count = 0.0, 0
    for i, demo in enumerate(demonstrations):
        batches.check(demo, batches.DEMONSTRATION_ROWS, f"fit_reward_bias (demonstration batch {i})")
        rewards = np.asarray(rewards_fn(params, jnp.asarray(demo["tokens"]), jnp.asarray(demo["valid"])),
                             np.float64)
        total, count = total + float(rewards.sum()), count + rewards.size
    if count == 0:
        raise ValueError("fit_reward_bias: no demonstrations given; pass the SFT demonstrations (tokens, valid)")
    shift = total / count
    if not math.isfinite(shift):
        raise FloatingPointError(f"fit_reward_bias: the demonstrations' mean reward is {shift}")
    return shift_reward_bias(params, shift), shift


# --- scoring with a trained reward model ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def _reward_fn(model: ScoreModel):
    return jax.jit(lambda p, t, v: sequence_rewards(p, t, v, model=model))


def reward_scores(model: ScoreModel, params, tokens_NT: np.ndarray, valid_NT: np.ndarray,
                  batch_size: int = 64) -> np.ndarray:
    """Reward of every row (read at its last valid token), in fixed-size batches (one compiled shape). Parameters
    placed on a mesh (replicated over its data axes) score each batch's rows split over those devices."""
    fn = _reward_fn(model)
    n = len(tokens_NT)
    mesh = sharding.mesh_of(params)
    split = sharding.data_parallel_size(mesh) if mesh is not None else 1
    B = -(-min(batch_size, n) // split) * split  # a few rows fewer than a batch: rounded up to fill every device
    mesh = sharding.row_mesh(mesh, B)
    out = []
    for start in range(0, n, B):
        t, v = tokens_NT[start:start + B], valid_NT[start:start + B]
        k = len(t)
        if k < B:  # pad the last batch by repeating its last row: one compiled shape
            t, v = np.concatenate([t, np.repeat(t[-1:], B - k, 0)]), np.concatenate([v, np.repeat(v[-1:], B - k, 0)])
        out.append(np.asarray(fn(params, *sharding.split_rows(mesh, t, v)))[:k])
    return np.concatenate(out)


def ranking_metrics(model: ScoreModel, params, path: str, tokenizer: Tokenizer, seq_len: int,
                    num_slots: int | None = None) -> dict:
    """K-wise ranking loss and pairwise accuracy of a reward model over every ranking in ``path``."""
    ex = post_training.ranking_examples(path, tokenizer, seq_len, num_slots=num_slots)
    N, K, T = ex["tokens"].shape
    scores_NK = reward_scores(model, params, ex["tokens"].reshape(N * K, T), ex["valid"].reshape(N * K, T)
                              ).reshape(N, K)
    n = ex["num_ranked"].astype(np.int64)
    return {"source": path, "pairwise_accuracy": float(pairwise_accuracy(jnp.asarray(scores_NK),
                                                                        jnp.asarray(ex["num_ranked"]))),
            "ranking_loss": float(ranking_loss(jnp.asarray(scores_NK), jnp.asarray(ex["num_ranked"]))),
            "num_rankings": int(N), "num_pairs": int(np.sum(n * (n - 1) // 2))}


def score_answers(model: ScoreModel, params, tokenizer: Tokenizer, path: str) -> list[dict]:
    """Reward of each (prompt, response) in ``path``, rendered as in reward-model training (prompt + answer + EOS)."""
    answers = post_training.read_answers(path)
    rows = [np.concatenate([chat.render_prompt(c, tokenizer, where=w), chat.render_response(r, tokenizer, where=w)])
            for w, c, r in answers]
    T = max(map(len, rows))
    if T > model.cfg.max_len:
        w = answers[int(np.argmax([len(r) for r in rows]))][0]
        raise ConfigError(f"{w}: prompt + response is {T} tokens > the reward model's context {model.cfg.max_len}")
    tokens = np.full((len(rows), T), tokenizer.pad_id, np.int32)
    valid = np.zeros((len(rows), T), bool)
    for i, r in enumerate(rows):
        tokens[i, :len(r)], valid[i, :len(r)] = r, True
    scores = reward_scores(model, params, tokens, valid)
    return [{"where": w, "prompt": c[-1]["content"], "response": r, "score": float(s)}
            for (w, c, r), s in zip(answers, scores)]


def _bias_record(workdir: str) -> dict | None:
    path = paths.as_path(workdir) / REWARD_BIAS_FILE
    return json.loads(path.read_text()) if path.exists() else None


def fitted_bias(workdir: str, step: int) -> float | None:
    """The demonstration-centring shift fitted after RM training, if it was fitted on this step's params."""
    record = _bias_record(workdir)
    if record is None:
        return None
    return float(record["shift"]) if int(record.get("step", step)) == step else None


def load_reward_params(path: str, abstract_params, field: str) -> dict:
    """Reward-model params of the run at ``path`` with its demonstration-centring bias applied (if fitted)."""
    params = common.load_full_params(path, abstract_params, field)
    record = _bias_record(path)
    if record is not None:
        params = shift_reward_bias(params, record["shift"])
    return params


# --- the stage ------------------------------------------------------------------------------------------------

def objective(cfg, model: ScoreModel):
    return functools.partial(reward_loss, model=model)


def demonstration_rows(path: str, tokenizer: Tokenizer, seq_len: int, batch_size: int, rendered=None):
    """(tokens, valid) batches of whole conversations, one per row, right-padded: the RM bias's reference set
    (``batches.DEMONSTRATION_ROWS``). ``rendered``: ``post_training.render_sft`` of ``path``, if done already."""
    rendered = rendered if rendered is not None else post_training.render_sft(path, tokenizer, seq_len)
    for i in range(0, len(rendered), batch_size):
        chunk = rendered[i:i + batch_size]
        tokens = np.full((len(chunk), seq_len), tokenizer.pad_id, np.int32)
        valid = np.zeros((len(chunk), seq_len), bool)
        for r, (toks, _) in enumerate(chunk):
            tokens[r, :len(toks)], valid[r, :len(toks)] = toks, True
        yield {"tokens": tokens, "valid": valid}


def run(cfg, workdir: str) -> loop.TrainResult:
    """K-wise ranking loss on ``data.train_path`` rankings; then the bias that centres demonstrations at 0."""
    cfg = common.resolved_config(cfg)
    t = cfg.train
    tokenizer, model, mesh, micro = common.build_for_training(
        cfg, ScoreModel, train_data="the rankings (JSONL, {\"prompt\": ..., \"responses\": [best..worst]})")
    slots = int(cfg.data.num_slots) or None
    pack = bool(cfg.data.get("pack", False))
    train_iter = post_training.ranking_batches(cfg.data.train_path, tokenizer, int(t.seq_len), micro,
                                               seed=int(t.seed), num_slots=slots, pack=pack)
    eval_iter = common.held_out_batches(post_training.ranking_batches, cfg, tokenizer, micro, num_slots=slots,
                                        pack=pack)
    # Scored at the model's whole context, not the training rows' length: a demonstration (a system turn and a long
    # answer, say) may outgrow the rankings' rows. Read before training, so a bad file is an error before it starts.
    demos = cfg.data.demos_path and post_training.render_sft(cfg.data.demos_path, tokenizer, model.cfg.max_len)
    result = loop.run_training(cfg, workdir, model=model, loss_fn=objective(cfg, model), train_iter=train_iter,
                               eval_iter=eval_iter, mesh=mesh, loss_is_token_nll=False)
    record = _bias_record(workdir)
    done = record is not None and (record.get("step"), record.get("demos")) == (result.step, cfg.data.demos_path)
    if cfg.data.demos_path and not done:  # a re-run of a finished run finds its bias fitted already
        params = jax.device_get(result.state.params)
        rows = demonstration_rows(cfg.data.demos_path, tokenizer, model.cfg.max_len, micro, rendered=demos)
        _, shift = fit_reward_bias(params, rows, model=model)
        if jax.process_index() == 0:
            paths.write_text_atomic(paths.as_path(workdir) / REWARD_BIAS_FILE, json.dumps(
                {"shift": shift, "demos": cfg.data.demos_path, "step": result.step}, indent=2))
    return result


def components(stored, tokenizer) -> list[registry.Component]:
    model_cfg, _ = common.resolve_from_init(stored)
    gpt_cfg = common.build_model_config(model_cfg, tokenizer, int(stored.train.seq_len))
    return [registry.Component("model", ScoreModel(common.no_dropout(gpt_cfg)), "params", "reward")]


def split_loss(stored, model: ScoreModel, tokenizer, params, split: str, max_batches: int | None) -> dict:
    """K-wise ranking loss and pairwise accuracy on the stored rankings of ``data.eval_path`` or ``train_path``."""
    del max_batches  # every ranking is scored
    d = stored.data
    path = d.eval_path if split == "eval" else d.train_path
    if not path:
        raise ConfigError(f"--split={split}: the reward run stores no data.{split}_path; choose another split")
    return {"split": split, **ranking_metrics(model, params, path, tokenizer, int(stored.train.seq_len),
                                              int(d.get("num_slots", 0)) or None)}


def report(run, params: Mapping, step: int, opts) -> dict:
    """With ``opts.answers_file``: the reward of each given answer (centred when the bias was fitted at ``step``)."""
    if not opts.answers_file:
        return {}
    main = run.components[0]
    shift = fitted_bias(run.workdir, step)
    scored_params = params[main.name] if shift is None else shift_reward_bias(params[main.name], shift)
    return {"answer_scores": {"centred": shift is not None, "bias_shift": shift,
                              "scores": score_answers(main.model, scored_params, run.tokenizer, opts.answers_file)}}


def bench(ctx) -> list:
    """One optimizer step of the shared trainer on synthetic rankings (``reward_k`` responses per prompt)."""
    c = ctx.c
    T, k = int(c.seq_len), int(c.reward_k)
    return [ctx.train_step(
        "reward", rows=int(c.reward_prompts), make_model=ScoreModel,
        make_loss=lambda model: functools.partial(reward_loss, model=model),
        make_batch=lambda cfg, rows, rng: ctx.ranking_batch(rng, rows, k, T, cfg.vocab_size),
        tokens_per_row=k * T, flops_per_token=lambda cfg: flops.score_flops_per_token(cfg, T), segments=0,
        extra={"responses_per_prompt": k})]


PLAN_SLOTS = 4  # responses per prompt when data.num_slots is 0 (the file's largest ranking; InstructGPT: 4 to 9)


def plan(cfg, mesh, frozen_mesh=None):
    """The reward model's train step: rows of ``data.num_slots`` ranked responses (else PLAN_SLOTS)."""
    T, K = int(cfg.train.seq_len), int(cfg.data.num_slots) or PLAN_SLOTS
    out = common.plan_train_step(cfg, mesh, model_class=ScoreModel, objective=objective,
                                 contract=batches.RANKING_BATCH, sizes={"K": K, "T": T},
                                 flops_per_row=lambda m: flops.score_flops_per_token(m, T) * T * K, unit_rows=K,
                                 frozen_mesh=frozen_mesh)
    if not int(cfg.data.num_slots):
        out.notes.append(f"data.num_slots=0 (the file's largest ranking): planned with {K} responses per prompt")
    return out


STAGE = registry.register(registry.Stage(
    name="reward", title="reward-model", run=run, components=components, objective=objective,
    batch=batches.RANKING_BATCH, split_loss=split_loss, report=report, bench=bench, plan=plan))
