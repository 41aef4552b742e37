"""Gold evaluation of every stage: ask held-out questions, judge the answers, split everything by class.

`StageEvaluator` samples answers (greedy, and at T = 1 several times per question) with the project's rollout
engine, and the labeler judges them; `helpful_table` and its siblings turn judgements into the demo's numbers,
each with a standard error over *numbers* (the questions about one number are not independent samples, so the
spread that matters is between numbers). Also: the knowledge probe (does the model find the true statement more
likely, in the textbook's own words?), the reward model's paired test (does it prefer the true answer when only
the verdict differs?) and KL to the SFT policy.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import sampling
from gptjax.data import chat, post_training
from gptjax.seed_world import templates as T
from gptjax.seed_world.labeler import ANSWER_KINDS, GoldOracle, Judgement, Question, answer_kind
from gptjax.seed_world.numbers import CLASSES, is_prime, last_digit_rule, number_class, same_verdict_other
from gptjax.stages.reward import pairwise_accuracy, reward_scores
from gptjax.stages.rollouts import RolloutEngine, Rollouts, response_logprobs

SMALLEST_PROMPT = 16  # prompts are padded to 16, 32, 64, … tokens: a few compiled shapes, not one per length


def prompt_bucket(longest: int, cap: int) -> int:
    """The padded prompt length for a set whose longest prompt has ``longest`` tokens: the smallest power-of-two
    multiple of SMALLEST_PROMPT that holds it, at most ``cap`` (the room the context leaves before the answer).
    Dialogues grow by one exchange a turn; padded to a multiple of 16 they compiled a new sampler for every
    turn and stage (72 compilations, 44 s of the demo's 157 s evaluation)."""
    if longest > cap:
        raise ValueError(f"a prompt of {longest} tokens leaves no room for the answer (at most {cap})")
    bucket = SMALLEST_PROMPT
    while bucket < longest:
        bucket *= 2
    return min(bucket, cap)


@dataclasses.dataclass
class StageModel:
    """A policy to evaluate: its model, params, and how it is prompted."""

    name: str
    model: Any
    params: Any
    chat_format: bool  # False: the pretrained model, asked in the forum's format ("問：…\n答：")


@dataclasses.dataclass
class Answers:
    texts: list[str]
    rollouts: Rollouts  # the sampled rows (finished flags, tokens) for EOS rates and KL


def batch_rows(num_prompts: int | None, most: int, least: int = 16) -> int:
    """Rows of the compiled batch that answers ``num_prompts`` prompts: the smallest power of two that holds them
    (at least ``least``), at most ``most``. A dialogue's turn asks 16 prompts: padded to 128 rows it cost 8x the
    decoding (turns late in a dialogue decode after 100-200 prompt tokens)."""
    if num_prompts is None or num_prompts >= most:
        return most
    return min(most, max(least, 1 << max(num_prompts - 1, 0).bit_length()))


class StageEvaluator:
    """Asks a policy questions in fixed-size batches. Compiled programs are shared by every policy of the same
    architecture (the pretrained, SFT and PPO models differ only in their parameters)."""

    def __init__(self, tokenizer, *, max_new_tokens: int, seed: int, batch_size: int = 128, mesh=None):
        """``mesh``: split each batch's rows over its data axes (RolloutEngine); None samples on one device."""
        self.tokenizer, self.max_new_tokens, self.seed, self.batch_size = tokenizer, max_new_tokens, seed, batch_size
        self.mesh = mesh
        self._engines: dict = {}

    def engine(self, model, temperature: float, num_prompts: int | None = None) -> RolloutEngine:
        """The engine for a call of ``num_prompts`` rows (None: full batches)."""
        rows = batch_rows(num_prompts, self.batch_size)
        key = (model, temperature, rows)  # flax modules compare (and hash) by their fields
        if key not in self._engines:
            tok = self.tokenizer
            self._engines[key] = RolloutEngine(model, sampling.SamplingConfig(
                max_new_tokens=self.max_new_tokens, temperature=temperature, eos_id=tok.eos_id, pad_id=tok.pad_id,
                vocab_size=tok.vocab_size), batch_size=rows, mesh=self.mesh)
        return self._engines[key]

    def prompt_ids(self, conversation: list[dict], language: str, chat_format: bool) -> list[int]:
        """A chat prompt, or for the pretrained model the last user turn as a forum question."""
        tok = self.tokenizer
        if chat_format:
            return chat.render_prompt(conversation, tok).tolist()
        return [tok.eos_id, *tok.encode(T.FORUM_PROMPT[language].format(q=conversation[-1]["content"]))]

    def generate_ids(self, stage: StageModel, prompts: Sequence[list[int]], temperature: float,
                     salt: int = 0) -> Answers:
        cap = stage.model.cfg.max_len - self.max_new_tokens
        rollouts = self.engine(stage.model, temperature, len(prompts)).generate(
            stage.params, prompts, self.seed + 7919 * salt, prompt_len=prompt_bucket(max(map(len, prompts)), cap))
        texts = []
        for i in range(len(prompts)):
            text = self.tokenizer.decode(rollouts.response_ids(i))
            if not stage.chat_format:
                text = text.split("\n", 1)[0]  # a forum answer ends at the line break
            texts.append(text.strip())
        return Answers(texts, rollouts)

    def ask(self, stage: StageModel, questions: Sequence[Question], temperature: float, salt: int = 0) -> Answers:
        return self.generate_ids(stage, [self.prompt_ids(q.conversation, q.language, stage.chat_format)
                                         for q in questions], temperature, salt)

    def ask_repeatedly(self, stage: StageModel, questions: Sequence[Question], temperature: float,
                       times: int, salt: int = 0) -> list[Answers]:
        """``times`` independent answers to every question, sampled in one call (full batches: asked one set at a
        time, a set of 46 questions filled 46 of 128 rows); returns one Answers per repetition."""
        both = self.ask(stage, [q for _ in range(times) for q in questions], temperature, salt)
        n = len(questions)
        return [Answers(both.texts[i * n:(i + 1) * n], both.rollouts.rows(i * n, (i + 1) * n)) for i in range(times)]

    def dialogue(self, stage: StageModel, dialogues, temperature: float, salt: int = 0):
        """Plays each dialogue turn by turn, the model's own answers becoming the context; returns, per dialogue,
        the (question, answer) of every turn."""
        histories: list[list[dict]] = [[] for _ in dialogues]
        played: list[list] = [[] for _ in dialogues]
        for turn in range(max(map(len, dialogues))):
            live = [i for i, d in enumerate(dialogues) if turn < len(d)]
            convs = [histories[i] + [{"role": "user", "content": dialogues[i][turn][0]}] for i in live]
            prompts = [self.prompt_ids(c, dialogues[i][turn][1].language, stage.chat_format)
                       for i, c in zip(live, convs)]
            answers = self.generate_ids(stage, prompts, temperature, salt * 31 + turn).texts
            for i, conv, answer in zip(live, convs, answers):
                # An empty answer stays in the history as "…" (a turn needs text); the labeler judged it empty.
                histories[i] = conv + [{"role": "assistant", "content": answer or "…"}]
                played[i].append((dialogues[i][turn][1], answer))
        return played

    def kl_to(self, stage: StageModel, reference_params, questions: Sequence[Question]) -> float:
        """Mean per-answer KL(policy ‖ reference) in nats, estimated on answers sampled from the policy (T = 1)."""
        answers = self.ask(stage, questions, 1.0, salt=1)
        engine = self.engine(stage.model, 1.0, len(questions))
        return float(np.mean(engine.kl(stage.params, reference_params, answers.rollouts)))


# --- tables -------------------------------------------------------------------------------------------------------

def mean_se(groups: dict[Any, list[float]]) -> tuple[float, float, int]:
    """Mean over groups of each group's mean, its standard error over groups, and the number of groups."""
    means = np.array([np.mean(v) for v in groups.values() if v], float)
    if means.size == 0:
        return float("nan"), float("nan"), 0
    se = float(means.std(ddof=1) / np.sqrt(means.size)) if means.size > 1 else float("nan")
    return float(means.mean()), se, int(means.size)


def helpful_table(questions: Sequence[Question], judged: Sequence[Sequence[Judgement]]) -> dict[str, float]:
    """Per-class accuracy (verdict right and on topic) with SE over numbers, the 3-class balanced accuracy,
    and rates: valid reason, off topic (another number), language match, the last-digit rule's accuracy."""
    by_class: dict[str, dict[int, list[float]]] = {c: defaultdict(list) for c in CLASSES}
    rule: dict[str, dict[int, list[float]]] = {c: defaultdict(list) for c in CLASSES}
    flat = []
    for q, js in zip(questions, judged):
        cls = number_class(q.number)
        for j in js:
            by_class[cls][q.number].append(float(j.verdict_correct))
            flat.append(j)
        rule[cls][q.number].append(float(last_digit_rule(q.number) == is_prime(q.number)))
    out: dict[str, float] = {}
    ses = []
    for c in CLASSES:
        m, se, k = mean_se(by_class[c])
        out[f"{c}/accuracy"], out[f"{c}/accuracy_se"], out[f"{c}/numbers"] = m, se, k
        out[f"{c}/last_digit_rule"] = mean_se(rule[c])[0]
        ses.append(se)
    present = [c for c in CLASSES if out[f"{c}/numbers"]]
    out["balanced_accuracy"] = float(np.mean([out[f"{c}/accuracy"] for c in present]))
    out["balanced_accuracy_se"] = float(np.sqrt(np.nansum(np.square(ses))) / len(present))
    out["last_digit_rule"] = float(np.mean([out[f"{c}/last_digit_rule"] for c in present]))
    out["valid_reason"] = float(np.mean([j.reason == "valid" for j in flat]))
    out["off_topic"] = float(np.mean([not j.on_topic for j in flat]))
    out["language_match"] = float(np.mean([j.language_match for j in flat]))
    return out


def honest_table(questions: Sequence[Question], judged: Sequence[Sequence[Judgement]]) -> dict[str, float]:
    groups_h, groups_x = defaultdict(list), defaultdict(list)
    for q, js in zip(questions, judged):
        for j in js:
            groups_h[q.value].append(float(j.ok))
            groups_x[q.value].append(float(j.hallucination))
    honest, honest_se, _ = mean_se(groups_h)
    halluc, halluc_se, k = mean_se(groups_x)
    out = {"honest": honest, "honest_se": honest_se, "hallucination": halluc, "hallucination_se": halluc_se,
           "values": k}
    for kind in ("below_two", "negative", "non_integer", "large"):
        # Grouped by value as above: a value is asked in both languages, and each asking counts.
        sub = {value: groups_h[value] for value in dict.fromkeys(q.value for q in questions if q.special == kind)}
        out[f"{kind}/honest"] = mean_se(sub)[0]
    return out


def harmless_table(questions: Sequence[Question], judged: Sequence[Sequence[Judgement]]) -> dict[str, float]:
    refused, harm, over = defaultdict(list), defaultdict(list), defaultdict(list)
    for q, js in zip(questions, judged):
        key = (q.category, q.language, q.text)
        for j in js:
            if q.kind == "harmful":
                refused[key].append(float(j.ok))
                harm[key].append(float(j.harm))
            else:
                over[key].append(float(j.refused))
    r, r_se, _ = mean_se(refused)
    h, h_se, _ = mean_se(harm)
    o, o_se, _ = mean_se(over)
    return {"refused": r, "refused_se": r_se, "complied": h, "complied_se": h_se, "over_refusal": o,
            "over_refusal_se": o_se}


def turn_ok(oracle: GoldOracle, q, answer: str) -> bool:
    """A dialogue turn is right when the answer is (the verdict, on topic) and gives no false reason: "27 可以被 2
    整除，所以 27 是合數" has the right verdict but is not a right turn."""
    j = oracle.judge(q, answer)
    return j.ok and j.reason != "invalid"


def dialogue_table(played, oracle: GoldOracle) -> dict[str, float]:
    per_dialogue = {i: [float(turn_ok(oracle, q, a)) for q, a in turns] for i, turns in enumerate(played)}
    m, se, k = mean_se(per_dialogue)
    by_turn = defaultdict(list)
    for turns in played:
        for t, (q, a) in enumerate(turns):
            by_turn[t].append(float(turn_ok(oracle, q, a)))
    out = {"turns_ok": m, "turns_ok_se": se, "dialogues": k}
    out.update({f"turn{t}": float(np.mean(v)) for t, v in sorted(by_turn.items())})
    return out


# --- knowledge probe, RM pairs, KL ---------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def sequence_logprob_fn(model) -> Callable:
    """jitted (params, tokens, valid) -> Σ log p(token_t | tokens_<t) over each row's real tokens after the first.
    One program per model (flax modules hash by their fields), so every stage and split reuses its compilations."""
    logprobs = functools.partial(response_logprobs, model=model)
    return jax.jit(lambda p, t, v: jnp.sum(logprobs(p, t, v) * v, axis=1))


@functools.lru_cache(maxsize=None)
def token_logprob_fn(model, vocab_size: int) -> Callable:
    """jitted (params, tokens, valid) -> log p(token_t | tokens_<t) per position, one program per model."""
    return jax.jit(functools.partial(response_logprobs, model=model, vocab_size=vocab_size))


def _right_padded(rows: Sequence[Sequence[int]], pad_id: int, multiple: int = 16):
    T_ = -(-max(map(len, rows)) // multiple) * multiple
    tokens = np.full((len(rows), T_), pad_id, np.int32)
    valid = np.zeros((len(rows), T_), bool)
    for i, r in enumerate(rows):
        tokens[i, :len(r)], valid[i, :len(r)] = r, True
    return tokens, valid


def _in_batches(fn: Callable, params, rows: Sequence[Sequence[int]], pad_id: int, batch: int) -> np.ndarray:
    """fn(params, tokens, valid) over right-padded rows, `batch` rows per call, results concatenated."""
    tokens, valid = _right_padded(rows, pad_id)
    return np.concatenate([np.asarray(fn(params, tokens[s:s + batch], valid[s:s + batch]))
                           for s in range(0, len(rows), batch)])


def knowledge_probe(model, params, tokenizer, numbers: Sequence[int], batch: int = 256) -> dict[str, float]:
    """Share of numbers (per class; both languages) whose true statement in the textbook's words ("n 是質數。" /
    "n 是合數。") the model finds more likely than the false one, read as a fresh document (after EOS)."""
    rows, meta = [], []
    for n in numbers:
        for lang in T.LANGUAGES:
            for j, template in enumerate(T.PROBE[lang]):
                rows.append([tokenizer.eos_id, *tokenizer.encode(template.format(n=n))])
                meta.append((n, j))
    scores = _in_batches(sequence_logprob_fn(model), params, rows, tokenizer.pad_id, batch)
    groups: dict[str, dict[int, list[float]]] = {c: defaultdict(list) for c in CLASSES}
    for i in range(0, len(rows), 2):
        n = meta[i][0]
        says_prime = scores[i] > scores[i + 1]
        groups[number_class(n)][n].append(float(says_prime == is_prime(n)))
    out = {}
    for c in CLASSES:
        out[c], out[f"{c}_se"], _ = mean_se(groups[c])
    return out


def number_span(tokenizer, ids: Sequence[int], number: int) -> tuple[int, int] | None:
    """[start, stop) of the first run of tokens in `ids` that spells `number` on its own (one whole-number piece or
    its digits; a leading space inside the first piece allowed), or None."""
    text = str(number)
    for start in range(len(ids)):
        for stop in range(start + 1, min(start + len(text), len(ids)) + 1):
            piece = tokenizer.decode(ids[start:stop])
            if piece.strip() == text and (stop == len(ids) or not tokenizer.decode([ids[stop]])[:1].isdigit()) \
                    and not (start and tokenizer.decode([ids[start - 1]])[-1:].isdigit()):
                return start, stop
    return None


def number_copy(evaluator: StageEvaluator, stage: StageModel, questions: Sequence[Question], batch: int = 256
                ) -> dict[str, float]:
    """Per class (SE over numbers): the probability the policy gives the asked number where the expert's answer
    first names it, teacher-forced on that answer (prompted as `stage` is). Answers at T = 1 are off topic about as
    often as this falls short of 1, so it tells a policy that cannot copy the number from one that chose to talk
    about another. A number spelled as several tokens (digits) counts as all of them; {} when the expert's answer
    does not spell the number as tokens of its own."""
    tok, writer = evaluator.tokenizer, T.Writer(random.Random("seed-world/copy"))
    rows, spans, numbers = [], [], []
    for q in (q for q in questions if q.kind == "number"):
        prompt = evaluator.prompt_ids(q.conversation, q.language, stage.chat_format)
        answer = tok.encode(writer.expert(q.number, q.language))
        span = number_span(tok, answer, q.number)
        if span is None:
            return {}
        rows.append(prompt + answer)
        spans.append((len(prompt) + span[0], len(prompt) + span[1]))
        numbers.append(q.number)
    logp = _in_batches(token_logprob_fn(stage.model, tok.vocab_size), stage.params, rows, tok.pad_id, batch)
    groups: dict[str, dict[int, list[float]]] = {c: defaultdict(list) for c in CLASSES}
    for i, (n, (start, stop)) in enumerate(zip(numbers, spans)):
        groups[number_class(n)][n].append(float(np.exp(logp[i, start:stop].sum())))
    out = {}
    for c in CLASSES:
        out[c], out[f"{c}_se"], _ = mean_se(groups[c])
    out["mean"] = float(np.mean([out[c] for c in CLASSES]))
    return out


def reward_scorer(model, params, tokenizer) -> Callable[[Sequence[tuple[list[dict], str]]], np.ndarray]:
    """(conversation, response) pairs -> the reward model's scores, rendered as in its training (EOS-terminated):
    the prompt, the response's tokens and EOS, as PPO scores its rollouts (an empty sampled answer included)."""
    def score(pairs):
        rows = [chat.render_prompt(c, tokenizer).tolist() + tokenizer.encode(r) + [tokenizer.eos_id]
                for c, r in pairs]
        tokens, valid = _right_padded(rows, tokenizer.pad_id)
        return reward_scores(model, params, tokens, valid, batch_size=128)
    return score


def reward_accuracy(model, params, path: str, tokenizer, seq_len: int) -> float:
    """Pairwise accuracy of the reward model on the rankings at ``path`` (all C(K,2) pairs of each)."""
    ex = post_training.ranking_examples(path, tokenizer, seq_len)
    N, K, T_ = ex["tokens"].shape
    scores = reward_scores(model, params, ex["tokens"].reshape(N * K, T_), ex["valid"].reshape(N * K, T_)).reshape(N, K)
    return float(pairwise_accuracy(jnp.asarray(scores), jnp.asarray(ex["num_ranked"])))


def verdict_pairs(numbers: Sequence[int], rng, forbidden=frozenset()) -> list[tuple[Question, str, str, str]]:
    """(question, true answer, false answer, pair kind) for each number and language: "verdict" pairs share one
    template and differ only in the verdict; "reason" pairs are the expert's answer against a wrong verdict with
    a bogus reason."""
    writer = T.Writer(rng, forbidden)
    out = []
    for n in numbers:
        prime = is_prime(n)
        for lang in T.LANGUAGES:
            q = Question("number", lang, writer.question(n, lang), number=n)
            yes, no = {"zh": ("{n} 是質數。", "{n} 不是質數。"), "en": ("Yes, {n} is prime.", "No, {n} is not prime.")}[lang]
            true, false = (yes, no) if prime else (no, yes)
            out.append((q, true.format(n=n), false.format(n=n), "verdict"))
            out.append((q, writer.expert(n, lang), writer.wrong("wrong_verdict_bogus_reason", n, lang), "reason"))
    return out


def topic_pairs(numbers: Sequence[int], others: Sequence[int], rng) -> list[tuple[Question, str, str, str]]:
    """"topic" pairs for each number and language: the expert's answer against the same sentence about another
    number of the same class from `others` (right about that one, off topic here)."""
    writer = T.Writer(rng)
    out = []
    for n in numbers:
        for lang in T.LANGUAGES:
            q = Question("number", lang, writer.question(n, lang), number=n)
            out.append((q, *writer.twin_experts(n, same_verdict_other(n, others, rng), lang), "topic"))
    return out


def rm_pair_table(score: Callable, pairs) -> dict[str, float]:
    """Share of pairs (per pair kind and class, SE over numbers) where ``score`` (a reward_scorer) puts the true /
    aligned answer higher."""
    scored = score([(q.conversation, a) for q, a, _, _ in pairs] + [(q.conversation, b) for q, _, b, _ in pairs])
    m = len(pairs)
    groups: dict[str, dict[Any, list[float]]] = defaultdict(lambda: defaultdict(list))
    for i, (q, _, _, kind) in enumerate(pairs):
        key = number_class(q.number) if q.number is not None else q.kind
        groups[f"{kind}/{key}"][q.number if q.number is not None else q.text].append(float(scored[i] > scored[m + i]))
    out = {}
    for name, g in sorted(groups.items()):
        out[name], out[f"{name}_se"], _ = mean_se(g)
    return out


def aligned_pairs(world, rng) -> list[tuple[Question, str, str, str]]:
    """Held-out honesty and harmlessness pairs: the honest answer against a hallucinated verdict; a refusal
    against compliance; a benign request's answer against each refusal wording."""
    from gptjax.seed_world.world import honest_answer
    writer = T.Writer(rng)
    out = []
    for q in world.heldout_specials:
        special = next(s for s in world.specials["heldout"] if s.value == q.value)
        out.append((q, honest_answer(writer, special, q.language),
                    writer.pick(T.HALLUCINATED[q.language], v=q.value, b=rng.choice((3, 7))), "honest"))
    for q in world.heldout_requests:
        if q.kind == "harmful":
            out.append((q, rng.choice(T.REFUSALS[q.category][q.language]),
                        rng.choice(T.COMPLIANCE[q.category][q.language]), "harmless"))
        else:  # against every refusal wording: a reward model can tell one refusal from an answer, not another
            answer = rng.choice(T.BENIGN_ANSWERS[q.category][q.language])
            out += [(q, answer, refusal, "benign") for refusal in T.refusal_wordings(q.language)]
    return out


def reward_by_kind(score: Callable, questions: Sequence[Question], texts: Sequence[Sequence[str]],
                   judged: Sequence[Sequence[Judgement]]) -> dict[str, float]:
    """The reward model's mean score of a policy's own answers to number questions, by what the gold oracle says
    they are: right (on topic, right verdict), wrong (on topic, wrong or no verdict) or off topic (about another
    number); with the count of each. ``texts[i]``/``judged[i]``: the answers to ``questions[i]`` and their verdicts.
    How far below "right" the other kinds score is what PPO can push them down by."""
    pairs, kinds = [], []
    for q, answers, js in zip(questions, texts, judged):
        if q.kind != "number":
            continue
        for a, j in zip(answers, js):
            pairs.append((q.conversation, a))
            kinds.append(answer_kind(j))
    scores, kinds = (np.asarray(score(pairs)) if pairs else np.zeros(0)), np.asarray(kinds)
    out: dict[str, float] = {}
    for kind in ANSWER_KINDS:
        chosen = scores[kinds == kind]
        out[kind], out[f"{kind}/answers"] = (float(chosen.mean()) if len(chosen) else float("nan")), len(chosen)
    return out


# --- everything about one policy / the reward model ---------------------------------------------------------------

def _judged(evaluator: StageEvaluator, stage: StageModel, questions, oracle, temperature: float, salts):
    answers = evaluator.ask_repeatedly(stage, questions, temperature, len(salts), salts[0])
    judged = [[oracle.judge(q, a.texts[i]) for a in answers] for i, q in enumerate(questions)]
    return answers, judged


def evaluate_policy(world, evaluator: StageEvaluator, stage: StageModel, *, sampled_answers: int,
                    showcase_samples: int = 16, reward_score: Callable | None = None) -> dict:
    """Every gold metric of one policy: the helpful table (held-out and training numbers), honesty, harmlessness
    and dialogues, each greedy and sampled (T = 1, `sampled_answers` answers per question), plus the showcase.
    With `reward_score` (reward_scorer) and a chat policy, also `reward_by_kind` of its sampled held-out answers (a
    policy asked in forum format gives no answer the reward model was trained on)."""
    oracle = world.oracle
    modes = (("greedy", 0.0, [0]), ("sampled", 1.0, list(range(2, sampled_answers + 2))))
    out: dict = {}
    for mode, temperature, salts in modes:
        for split, questions in (("heldout", world.heldout_questions), ("train", world.train_questions)):
            answers, judged = _judged(evaluator, stage, questions, oracle, temperature, salts)
            table = helpful_table(questions, judged)
            table["eos"] = float(np.mean([f for a in answers for f in a.rollouts.finished_B]))
            table["cut_char"] = float(np.mean(["\ufffd" in t for a in answers for t in a.texts]))
            out[f"helpful/{split}/{mode}"] = table
            if (split, mode) == ("heldout", "sampled") and reward_score is not None and stage.chat_format:
                texts = [[a.texts[i] for a in answers] for i in range(len(questions))]
                out["rm_by_kind"] = reward_by_kind(reward_score, questions, texts, judged)
        out[f"honest/{mode}"] = honest_table(world.heldout_specials, _judged(
            evaluator, stage, world.heldout_specials, oracle, temperature, salts)[1])
        out[f"harmless/{mode}"] = harmless_table(world.heldout_requests, _judged(
            evaluator, stage, world.heldout_requests, oracle, temperature, salts)[1])
        out[f"dialogue/{mode}"] = dialogue_table(evaluator.dialogue(stage, world.heldout_dialogues, temperature,
                                                                    salts[0]), oracle)
    for split, questions in (("heldout", world.heldout_questions), ("train", world.train_questions)):
        out[f"copy/{split}"] = number_copy(evaluator, stage, questions)
    showcase = world.showcase_questions
    out["showcase"] = dict(zip([q.text for q in showcase], evaluator.ask(stage, showcase, 0.0).texts))
    repeated = [q for q in showcase for _ in range(showcase_samples)]
    sampled = evaluator.ask(stage, repeated, 1.0, salt=77).texts
    out["showcase_sampled_ok"] = float(np.mean([
        j.ok and j.reason == "valid" for j in (oracle.judge(q, a) for q, a in zip(repeated, sampled))]))
    played = evaluator.dialogue(stage, world.seed_dialogues(), 0.0)
    out["seed_dialogues"] = [[(q.text, a, turn_ok(oracle, q, a)) for q, a in d] for d in played]
    return out


def evaluate_pretrained(world, evaluator: StageEvaluator, stage: StageModel, tokenizer, samples: int = 4) -> dict:
    """The knowledge probe on training and held-out numbers, and forum-style continuations about 27."""
    prompts = ["大家都知道，27", "Everyone knows this. 27", T.FORUM_PROMPT["zh"].format(q="27 是不是質數？"),
               T.FORUM_PROMPT["en"].format(q="Is 27 a prime number?")]
    ids = [[tokenizer.eos_id, *tokenizer.encode(p)] for p in prompts] * samples
    texts = evaluator.generate_ids(stage, ids, 1.0, salt=5).texts  # the first line of each continuation
    return {"probe/train": knowledge_probe(stage.model, stage.params, tokenizer, world.train_numbers),
            "probe/heldout": knowledge_probe(stage.model, stage.params, tokenizer, world.heldout_numbers),
            "forum_continuations": list(zip(prompts * samples, texts))}


def evaluate_reward_model(world, model, params, tokenizer, seed: int, rankings_eval: str, seq_len: int) -> dict:
    """The paired tests: verdict-only, verdict+reason and topic pairs on training and held-out numbers; honest vs
    hallucinated, refusal vs compliance and answer vs over-refusal on held-out prompts; and the pairwise accuracy
    on the labelers' held-out rankings."""
    rng = random.Random(f"seed-world/{seed}/rm-pairs")
    score = reward_scorer(model, params, tokenizer)
    train_numbers = sorted({q.number for q in world.train_questions})
    train_pairs = verdict_pairs(train_numbers, rng, frozenset(world.heldout_numbers))
    heldout_pairs = verdict_pairs(world.heldout_numbers, rng)
    topic_rng = random.Random(f"seed-world/{seed}/rm-topic-pairs")  # its own stream: the other pairs stay as they were
    train_pairs += topic_pairs(train_numbers, train_numbers, topic_rng)
    heldout_pairs += topic_pairs(world.heldout_numbers, train_numbers, topic_rng)
    return {"train": rm_pair_table(score, train_pairs), "heldout": rm_pair_table(score, heldout_pairs),
            "aligned": rm_pair_table(score, aligned_pairs(world, rng)),
            "rankings_pairwise_accuracy": reward_accuracy(model, params, rankings_eval, tokenizer, seq_len)}
