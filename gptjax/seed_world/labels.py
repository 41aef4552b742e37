"""The simulated labelers: sample K answers per reward-model prompt, add the answers a labeler writes, rank them all.

InstructGPT's labelers ranked K = 4..9 sampled outputs and also wrote demonstrations. Here the SFT policy samples
`labels.k` answers per RM prompt; the labeler adds `written_answers` — the expert's answer and one flawed answer of
the kind the prompt invites (a wrong verdict, a hallucinated one, compliance, an over-refusal; on a number question
or a special value also an answer meant for another kind of value, on a harmful request also every benign category's
answer, on a benign request also every harmful category's refusal) —
so every ranking holds a pair that differs in what matters — and, with `verdict_pair`, a minimal pair for number
questions: the same bare sentence with the true and with the false verdict. Without it, the only answers whose
verdict alone decides their rank are the sampled ones, and a reward model could learn which verdict its data
rewarded more often instead of which is true (one seed's preferred "not prime" for every held-out prime). With
`topic_pairs` it also ranks, as a ranking of its own, the expert's answer against the same answer about another
number (`topic_pair`): the policies' commonest error on new numbers is a right answer about the wrong number, and
without such pairs the reward model prefers the answer about the asked number in only 0.52-0.76 of them
(docs/results.md; the demo leaves them off: they cost it verdict accuracy and did not bring PPO on topic). With
`special_pairs` it ranks, likewise, the honest answer to a special value against the expert's answer about one of
its integer pieces ("4662" -> "46 不是質數…", "-27" -> "27 不是質數…"), the policies' commonest error there. The gold
oracle ranks them all (distinct scores only, best first); a written flaw that ties with an answer ranked before it
gets a ranking of its own against the expert's answer (`tied_written_pairs`). Held-out numbers never appear: the
prompts are about training numbers and the writer avoids the others.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from collections.abc import Sequence

from absl import logging

from gptjax.errors import ConfigError
from gptjax.seed_world import templates as T
from gptjax.seed_world.evaluation import StageEvaluator, StageModel
from gptjax.seed_world.labeler import Question
from gptjax.seed_world.numbers import numbers_in, same_verdict_other
from gptjax.seed_world.world import SeedWorld, honest_answer, number_pieces


# Answers to other kinds of value that a policy also gives to an ordinary number ("27 不是質數，因為它不是整數。",
# "I can't tell whether 27 is prime"): a reward model that never saw one ranked can score it above the right
# answer, and PPO finds it (docs/results.md#fine-tuning-the-token-rows-pretraining-never-saw).
MISPLACED_KINDS = ("below_two", "negative", "non_integer", "large_unknown")


def written_answers(q: Question, rng: random.Random, world: SeedWorld, verdict_pair: bool = False) -> list[str]:
    """The expert's answer to `q` and the flawed answers of the kind `q` invites (empty for other kinds); for a
    number question also an answer meant for another kind of value (MISPLACED_KINDS) and, with `verdict_pair`, the
    bare true and the bare false verdict; for a special value also an answer meant for another kind of value
    (`misplaced_special_answer`)."""
    writer = T.Writer(rng, frozenset(world.heldout_numbers))
    lang = q.language
    if q.kind == "number":
        answers = [writer.expert(q.number, lang), writer.wrong(rng.choice(T.WRONG_KINDS), q.number, lang),
                   writer.pick(T.HONEST[rng.choice(MISPLACED_KINDS)][lang], v=q.number)]
        if verdict_pair:
            answers += [T.LABELER_VERDICTS[v][lang].format(n=q.number) for v in (q.is_prime, not q.is_prime)]
        return answers
    if q.kind == "why":
        return [writer.why(q.number, lang), writer.wrong("wrong_verdict_bogus_reason", q.number, lang)]
    if q.kind == "definition":  # and the policies' failure on it: an answer about some number
        return [rng.choice(T.DEFINITION_ANSWERS[lang]), writer.expert(rng.choice(world.train_numbers), lang)]
    if q.kind == "special":
        special = next(s for s in world.specials["train"] if s.value == q.value)
        return [honest_answer(writer, special, lang),
                writer.pick(T.HALLUCINATED[lang], v=q.value, b=rng.choice((3, 7))), misplaced_special_answer(q)]
    if q.kind == "harmful":
        # and a benign category's answer: the policies' commonest failure on a request phrased as none they were
        # shown ("怎麼偷看老師電腦裡的考卷密碼？" -> the lottery answer). Harmless, but not a refusal: it ranks between
        # the refusal and compliance. Without it no ranking shows the reward model that it is worse than a
        # refusal, and a stronger PPO learned to answer harmful requests so (docs/results.md).
        # Every benign category's answer, not one: with one, the reward model shown every refusal wording on benign
        # requests preferred the lottery answer to a refusal on held-out harmful ones (docs/results.md).
        # The random one comes first (it is the one a ranking keeps; the others tie with it) and the labels' random
        # stream draws what it drew before, so every other ranking stays as it was.
        answers = [rng.choice(T.REFUSALS[q.category][lang]), rng.choice(T.COMPLIANCE[q.category][lang]),
                   rng.choice(T.BENIGN_ANSWERS[rng.choice(sorted(T.BENIGN_ANSWERS))][lang])]
        return answers + [a for c in sorted(T.BENIGN_ANSWERS) for a in T.BENIGN_ANSWERS[c][lang] if a not in answers]
    if q.kind == "benign":
        # the bare over-refusal and every harmful category's: ranked only against the bare one, a reward model
        # scored "Sorry, I can't help insult someone…" above every benign answer to a benign request (the random
        # wording first, as above)
        answers = [rng.choice(T.BENIGN_ANSWERS[q.category][lang]), rng.choice(T.OVER_REFUSAL[lang]),
                   rng.choice(T.category_refusals(lang))]
        return answers + [r for r in T.category_refusals(lang) if r not in answers]
    return []


def misplaced_special_answer(q: Question) -> str:
    """The answer meant for another kind of value, given to a special one: the check of a number beyond the range
    ("No — it is divisible by 2.") on 0, 1, a negative or a non-integer, "it is not a whole number" on a number
    beyond the range. A reward model that never saw one ranked scored it above the honest answer, and one seed's
    PPO answered "Is 67.6 one of the prime numbers?" with "No — it is divisible by 2." (docs/results.md)."""
    if q.special == "large":
        return T.HONEST["non_integer"][q.language][0]
    divisor = random.Random(q.text).choice((2, 3, 5, 7))  # its own stream: the other written answers keep their draws
    return T.HONEST["large_divisible"][q.language][0].format(d=divisor)


def tied_written_pairs(oracle, q: Question, written: Sequence[str], record: dict | None) -> list[dict]:
    """Rankings of their own for written answers that `record` dropped: a ranking keeps one answer per gold score
    level, so a written flaw that ties with an answer ranked before it (on a benign request the bare over-refusal
    and the one in a harmful category's words always tie) never reached the reward model. Each is ranked against
    the expert's answer (written[0]). Without them 46 of 53 benign rankings of one seed held no refusal in a harmful
    category's words, and the reward model scored "Sorry, I can't help write a message that deceives people…" above
    the answer to most benign training requests."""
    if q.kind not in ("benign", "harmful", "special"):
        # Number questions keep their rankings: their written flaws often tie with sampled answers, and the extra
        # verdict pairs would shift the reward model's helpful data, which these pairs were not measured on.
        return []
    kept = set(record["responses"]) if record else set()
    out = []
    for answer in written[1:]:
        if answer not in kept and (pair := oracle.ranking_record(q, [written[0], answer])):
            out.append(pair)
    return out


def topic_pair(q: Question, rng: random.Random, world: SeedWorld) -> list[str]:
    """[the expert's answer to `q`, the same answer about another training number] for a number question (a number
    of the same class: only the subject differs); for a special value with an integer piece in range (2 and up, not
    held out), [the honest answer, the expert's answer about that piece]: "4662" read as "46" "62", 27 of "-27",
    12 of "12.5", 139 of "139/8" — what the policies answer about such values; empty otherwise."""
    heldout = frozenset(world.heldout_numbers)
    writer = T.Writer(rng, heldout)
    if q.kind == "number":
        other = same_verdict_other(q.number, world.train_numbers, rng)
        return list(writer.twin_experts(q.number, other, q.language))
    if q.kind == "special":
        cfg = world.config
        whole = (number_pieces(q.value, cfg.max_number, cfg.number_tokens) if q.special == "large"
                 else numbers_in(q.value))
        pieces = [p for p in sorted(int(x) for x in whole)
                  if 2 <= p <= cfg.max_number and p not in heldout]
        if pieces:
            special = next(s for s in world.specials["train"] if s.value == q.value)
            return [honest_answer(writer, special, q.language), writer.expert(rng.choice(pieces), q.language)]
    return []


def check_cannot_tell_credit(credit: float) -> None:
    """Raises ConfigError naming `labels.cannot_tell_credit` unless it is a share in [0, 1]."""
    if not 0 <= credit <= 1:
        raise ConfigError(f"labels.cannot_tell_credit: {credit} is not in [0, 1] (a share of the aligned score); "
                          f"set it between 0 and 1")


def rankings_paths(out_dir: str) -> dict[str, str]:
    """The rankings files `label_rankings` writes in `out_dir`, by split ("train", "eval")."""
    return {split: os.path.join(out_dir, f"rankings_{split}.jsonl") for split in ("train", "eval")}


def label_rankings(world: SeedWorld, evaluator: StageEvaluator, policy: StageModel, out_dir: str, *, k: int,
                   written: bool, eval_fraction: float, seed: int, verdict_pair: bool = False,
                   topic_pairs: bool = False, special_pairs: bool = False,
                   cannot_tell_credit: float | None = None) -> dict[str, str]:
    """Writes rankings_{train,eval}.jsonl in `out_dir` (the reward model's data) and returns their paths.
    `cannot_tell_credit`, when given, replaces the oracle's (GoldOracle.cannot_tell_credit) for the ranking."""
    if cannot_tell_credit is not None:
        check_cannot_tell_credit(cannot_tell_credit)
    questions: Sequence[Question] = world.rm_prompts
    oracle = (world.oracle if cannot_tell_credit is None
              else dataclasses.replace(world.oracle, cannot_tell_credit=float(cannot_tell_credit)))
    samples = [evaluator.ask(policy, questions, 1.0, salt=100 + i).texts for i in range(k)]
    rng = random.Random(f"seed-world/{seed}/labels")
    records = []
    for qi, q in enumerate(questions):
        labeler_written = written_answers(q, rng, world, verdict_pair) if written else []
        answers = [samples[i][qi] for i in range(k)] + labeler_written
        record = oracle.ranking_record(q, answers, max_ranked=9)
        if record is not None:
            records.append(record)
        records += tied_written_pairs(oracle, q, labeler_written, record)
        paired = topic_pairs if q.kind == "number" else special_pairs
        pair = topic_pair(q, rng, world) if paired else []
        if pair and (record := oracle.ranking_record(q, pair)) is not None:
            records.append(record)
    n_eval = max(1, int(round(eval_fraction * len(records))))
    os.makedirs(out_dir, exist_ok=True)
    paths = rankings_paths(out_dir)
    for name, part in (("eval", records[:n_eval]), ("train", records[n_eval:])):
        with open(paths[name], "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in part)
    logging.info("labeled %d rankings (%d held out) from %d prompts x %d samples%s", len(records), n_eval,
                 len(questions), k, " + written answers" if written else "")
    return paths
