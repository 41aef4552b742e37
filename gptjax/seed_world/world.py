"""The seed world, "27 是不是質數？": a small bilingual (中文 / English) world where RLHF has something to fix.

Everything is generated offline from `SeedWorldConfig` (same config -> identical world, in about a second):

  pretraining   number facts ("27 = 3 × 9。", "13 is prime.") mixed with forum posts that repeat confident
                claims, wrong at a set rate ("27 是一個質數，因為它是奇數。"), so a next-word model imitates both;
                plus a small fraction of template-format chats (`pretrain_chats`, forum-quality answers).
  SFT           an expert's answers ("27 不是質數，因為它可以被 3 整除。" / "No — 27 is divisible by 3."), a
                configurable fraction of them wrong (clean demos saturate SFT and leave the reward model nothing
                to learn, see reference.md), and multi-turn dialogues (what is a prime → is 27 prime → is π …).
  labeler       `GoldOracle`: parses an answer (verdict, stated divisors, language) and scores it: right verdict
                +1, valid reason (a true divisor, or "only 1 and itself" for a prime) +0.5, false reason -0.25,
                answer in the question's language +0.25; ranks K sampled answers for reward-model data.
  prompts       RM / PPO questions about training numbers, half about primes (unbalanced prompts let the reward
                model learn the composite base rate and PPO collapses to "not prime").
  held-out      numbers that never appear in SFT / RM / PPO text (only in pretraining), half primes and half
                composites, each asked in both languages and several phrasings: the gold evaluation set.

`write_jsonl` writes the world in the post-training JSONL formats so each stage can also run from files.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

LANGUAGES = ("zh", "en")

ZH_QUESTIONS = ("{n} 是不是質數？", "{n} 是質數嗎？", "請問 {n} 是質數嗎？", "{n} 是一個質數嗎？")
EN_QUESTIONS = ("Is {n} a prime number?", "Is {n} prime?", "Is {n} a prime?", "Is the number {n} prime?")
QUESTIONS = {"zh": ZH_QUESTIONS, "en": EN_QUESTIONS}
SHOWCASE_QUESTIONS = (("27 是不是質數？", 27, "zh"), ("Is 27 a prime number?", 27, "en"))

SYSTEM_PROMPTS = {"zh": "你是一位細心的數學老師。", "en": "You are a careful math tutor."}
BOGUS_DIVISORS = range(2, 10)  # "divisible by d" claims in wrong answers; never held out (heldout_min >= 10)


@dataclass(frozen=True)
class SeedWorldConfig:
    """Knobs of the seed world.

    The defaults give 312 held-out questions (26 primes + 26 composites, 2 languages x 3 phrasings) and 60k
    pretraining documents, about 6.3M byte-level tokens (the prototype's budget in reference.md). With the byte
    tokenizer single-turn SFT conversations render to <= ~150 tokens, dialogues to <= max_dialogue_tokens (512).
    """

    seed: int = 0
    """Everything is a deterministic function of the config; the seed picks held-out numbers and all texts."""

    # Numbers.
    max_number: int = 499
    """Numbers asked about are 2..max_number."""
    heldout_fraction: float = 0.3
    """Fraction of the eligible primes held out; as many composites are held out too, so the set is balanced."""
    heldout_min: int = 30
    """Smallest held-out number (also always > sqrt(max_number)): small numbers are the divisors that reasons
    cite everywhere, so they cannot be kept out of SFT text. Must be >= 10 (bogus divisors are 2..9)."""
    heldout_hard_composite_fraction: float = 0.5
    """Fraction of held-out composites that look prime (odd, not a multiple of 5, e.g. 91); the rest are drawn
    from the other composites."""
    heldout_phrasings: int = 3
    """Distinct question phrasings per held-out number and language (<= 4)."""
    reserved_numbers: tuple[int, ...] = (13, 27, 91)
    """Numbers never held out: the showcase questions and the examples the SFT data is built around."""

    # Pretraining corpus.
    num_pretrain_docs: int = 60_000
    """Documents in all: facts + forum posts (`pretrain_texts`) + template chats (`pretrain_chats`)."""
    forum_fraction: float = 0.25
    """Share of documents that are forum posts with confident claims."""
    forum_wrong_rate: float = 0.2
    """Probability that a forum claim is wrong (prime called composite or vice versa)."""
    forum_wrong_rate_odd_composite: float = 0.5
    """Same, for odd composites (the "27 looks prime" trap)."""
    forum_bogus_reason_rate: float = 0.6
    """Probability that a wrong forum claim comes with a bogus reason ("because it is odd")."""
    chat_fraction: float = 0.005
    """Share of documents that are chats in the template (forum-quality answers). Keep small: 3% made the
    pretrained model answer in format, too strong a baseline (reference.md)."""

    # SFT.
    num_sft_demos: int = 640
    """Single-turn expert demonstrations for SFT training (plus `num_dialogues` dialogues)."""
    num_sft_eval_demos: int = 128
    """Demonstrations (same distribution, training numbers) for the SFT held-out loss."""
    num_dialogues: int = 64
    """Multi-turn dialogues (definition, numbers, π, 1, "why?") in the SFT training set."""
    dialogue_questions: int = 4
    """Most user questions in one dialogue (>= 2)."""
    max_dialogue_tokens: int = 512
    """A dialogue stops before a question whose exchange would make it longer than this many tokens under the byte
    tokenizer and the chat template (the demo's SFT rows hold 512; a row needs tokens - 1 positions)."""
    wrong_demo_fraction: float = 0.2
    """Fraction of single-turn demonstrations that are wrong (reference.md found 20% useful)."""
    wrong_demo_mix: tuple[float, float, float, float] = (0.3, 0.3, 0.2, 0.2)
    """Relative weights of the wrong kinds: (wrong verdict, wrong verdict + bogus reason, right verdict + bogus
    reason, answer in the other language)."""
    system_prompt_rate: float = 0.1
    """Probability that a demonstration or dialogue opens with a system turn."""

    # Reward model and PPO prompts.
    num_rm_prompts: int = 512
    num_ppo_prompts: int = 1024
    prime_oversample: float = 3.0
    """Sampling weight of a prime relative to a composite in SFT demos and dialogues."""
    prompt_prime_share: float = 0.5
    """Share of primes among the RM and PPO prompts, exact by construction. 0.5 leaves the reward model no base
    rate to learn: at 38% primes (prime_oversample 3) it preferred "not prime" for 70% of primes, training and
    held-out alike, and PPO pushed the policy towards "not prime"."""

    # The labeler's scores.
    verdict_weight: float = 1.0
    reason_weight: float = 0.5
    false_reason_penalty: float = 0.25
    language_weight: float = 0.25

    def validate(self) -> None:
        """Raises ValueError naming the bad field and its valid range."""
        def check(ok: bool, name: str, rule: str):
            if not ok:
                raise ValueError(f"SeedWorldConfig.{name} = {getattr(self, name)!r}: must be {rule}")
        check(self.max_number >= 100, "max_number", ">= 100")
        check(0 < self.heldout_fraction < 1, "heldout_fraction", "in (0, 1)")
        check(10 <= self.heldout_min < self.max_number, "heldout_min", "in [10, max_number)")
        check(0 <= self.heldout_hard_composite_fraction <= 1, "heldout_hard_composite_fraction", "in [0, 1]")
        check(1 <= self.heldout_phrasings <= len(ZH_QUESTIONS), "heldout_phrasings", f"in 1..{len(ZH_QUESTIONS)}")
        for name in ("forum_fraction", "forum_wrong_rate", "forum_wrong_rate_odd_composite",
                     "forum_bogus_reason_rate", "chat_fraction", "wrong_demo_fraction", "system_prompt_rate"):
            check(0 <= getattr(self, name) <= 1, name, "in [0, 1]")
        check(self.forum_fraction + self.chat_fraction <= 1, "chat_fraction", "<= 1 - forum_fraction")
        check(len(self.wrong_demo_mix) == 4 and min(self.wrong_demo_mix) >= 0 and sum(self.wrong_demo_mix) > 0,
              "wrong_demo_mix", "4 non-negative weights, not all 0")
        check(self.dialogue_questions >= 2, "dialogue_questions", ">= 2")
        check(self.max_dialogue_tokens >= 64, "max_dialogue_tokens", ">= 64")
        check(self.prime_oversample > 0, "prime_oversample", "> 0")
        check(0 < self.prompt_prime_share < 1, "prompt_prime_share", "in (0, 1)")
        for name in ("num_pretrain_docs", "num_sft_demos", "num_sft_eval_demos", "num_dialogues",
                     "num_rm_prompts", "num_ppo_prompts"):
            check(getattr(self, name) >= 0, name, ">= 0")


# ----------------------------------------------------------------------------------------------------------------
# Arithmetic


@functools.cache
def is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % d for d in range(2, math.isqrt(n) + 1))


def smallest_factor(n: int) -> int:
    """The smallest divisor d > 1 of a composite n."""
    return next(d for d in range(2, math.isqrt(n) + 1) if n % d == 0)


@functools.cache
def proper_divisors(n: int) -> tuple[int, ...]:
    """Divisors d of n with 1 < d < n."""
    return tuple(d for d in range(2, n) if n % d == 0)


_NUMERAL = re.compile(r"[0-9]+")


def numbers_in(text: str) -> set[int]:
    """Every integer written with ASCII digits in `text` (digit boundaries, so "27是" and "(27)" both count)."""
    return {int(m) for m in _NUMERAL.findall(text)}


# ----------------------------------------------------------------------------------------------------------------
# The labeler: parse an answer, judge it against the truth, rank K answers


@dataclass(frozen=True)
class ParsedAnswer:
    """What an answer claims, before knowing the question.

    verdict: True says "is prime", False says "is not prime", None says neither (or both: see conflicting).
    conflicting: says both.
    language: "zh", "en" or None (no text, or mixed).
    divisor_claims: (subject or None, d) for "divisible by d" / "被 d 整除" / "divisors of n are ...": d divides
      the subject (the number named by the claim) or, without one, the number asked about.
    products: (subject or None, a, b) for "n = a × b" / "a × b".
    non_divisor_claims: d for "not divisible by d" / "不能被 d 整除".
    prime_reason: says the only divisors are 1 and itself ("1 and itself", "1 和它自己", "只能被 1 和 13 整除").
    numbers: every integer mentioned.
    """

    verdict: bool | None
    conflicting: bool
    language: str | None
    divisor_claims: tuple[tuple[int | None, int], ...]
    products: tuple[tuple[int | None, int, int], ...]
    non_divisor_claims: tuple[int, ...]
    prime_reason: bool
    numbers: frozenset[int]


@dataclass(frozen=True)
class Judgement:
    """The labeler's view of one answer to "is n prime?" in `language`."""

    verdict_correct: bool
    reason: str  # "valid", "none" or "invalid"
    language_match: bool
    on_topic: bool  # mentions no integer other than n, 1 and the divisors it cites
    score: float


_CJK = re.compile(r"[\u3400-\u9fff]")
_WORD = re.compile(r"[A-Za-z]+")
_LIST = r"[0-9]+(?:\s*(?:,|，|、|and|or|和|與|或)\s*[0-9]+)*"
_EN_DIVISIBLE = re.compile(r"(?:divisible|divided)\s+by\s+(" + _LIST + ")", re.I)
_ZH_DIVISIBLE = re.compile(r"被\s*(" + _LIST + r")\s*整除")
_PRODUCT = re.compile(r"(?:([0-9]+)\s*=\s*)?([0-9]+)\s*[×xX*]\s*([0-9]+)")
_DIVISOR_LIST = re.compile(r"(?:divisors|factors)\s+of\s+([0-9]+)\s+are\s+(" + _LIST + ")"
                           r"|([0-9]+)\s*的(?:因數|因数|約數)(?:有|是|只有)\s*(" + _LIST + ")", re.I)
_PRIME_REASON = re.compile(r"1\s*(?:和|與|跟)\s*(?:它自己|它本身|自己|本身)|\b1\s+and\s+itself\b"
                           r"|只(?:能被|有)\s*1\s*(?:和|與|跟)\s*[0-9]+"
                           r"|\bonly\s+(?:divisible\s+by|(?:divisors|factors)\s+(?:of\s+[0-9]+\s+)?are)"
                           r"\s+1\s+and\s+[0-9]+", re.I)
_EN_NEGATION = re.compile(r"(?:\bnot|n't|\bcannot|\bnever)\s*(?:be\s*)?$", re.I)
_EN_NEG = re.compile(r"\bnot\s+(?:a\s+)?prime|\bisn['’]t\s+(?:a\s+)?prime|\bcomposite\b|^\W*no\b", re.I)
_EN_POS = re.compile(r"\bis\s+(?:(?:definitely|certainly|indeed|surely)\s+)?(?:a\s+)?prime\b|^\W*yes\b", re.I)
_ZH_NEG = re.compile(r"不是(?:一個|一个)?[質质]數|並非(?:一個)?[質质]數|[合][數数]|^\W*不是")
_ZH_POS = re.compile(r"(?<!不)是(?:一個|一个)?[質质]數|^\W*是的")
_SENTENCE = re.compile(r"[^。！!？?\n]*(?:[。！!？?\n]|$)")


def _numbers_of_list(text: str) -> list[int]:
    return [int(m) for m in _NUMERAL.findall(text)]


def _language(text: str) -> str | None:
    cjk, words = len(_CJK.findall(text)), len(_WORD.findall(text))
    if cjk + words == 0:
        return None
    if cjk / (cjk + words) >= 0.9:
        return "zh"
    if words / (cjk + words) >= 0.9:
        return "en"
    return None  # mixed languages match neither


def parse_answer(text: str) -> ParsedAnswer:
    """Parses an answer about primality; never raises (garbage gives an empty ParsedAnswer)."""
    if not isinstance(text, str):
        text = ""
    claims: list[tuple[int | None, int]] = []
    non_divisors: list[int] = []
    for m in _DIVISOR_LIST.finditer(text):
        subject = int(m.group(1) or m.group(3))
        claims += [(subject, d) for d in _numbers_of_list(m.group(2) or m.group(4))]
    products = [(int(m.group(1)) if m.group(1) else None, int(m.group(2)), int(m.group(3)))
                for m in _PRODUCT.finditer(text)]
    for pattern, negated in ((_EN_DIVISIBLE, lambda s: _EN_NEGATION.search(s) is not None),
                             (_ZH_DIVISIBLE, lambda s: "不" in s[-3:])):
        for m in pattern.finditer(text):
            ds = _numbers_of_list(m.group(1))
            if negated(text[max(0, m.start() - 12):m.start()]):
                non_divisors += ds
            else:
                claims += [(None, d) for d in ds]
    prime_reason = _PRIME_REASON.search(text) is not None

    # Verdict from statements only: a question echoed back ("27 是不是質數？") claims nothing.
    statements = "".join(s for s in _SENTENCE.findall(text) if not s.rstrip().endswith(("?", "？")))
    pos = bool(_EN_POS.search(statements) or _ZH_POS.search(statements))
    neg = bool(_EN_NEG.search(statements) or _ZH_NEG.search(statements))
    verdict = True if pos and not neg else False if neg and not pos else None
    return ParsedAnswer(verdict=verdict, conflicting=pos and neg, language=_language(text),
                        divisor_claims=tuple(claims), products=tuple(products),
                        non_divisor_claims=tuple(non_divisors), prime_reason=prime_reason,
                        numbers=frozenset(numbers_in(text)))


def judge(number: int, language: str, answer: str, *, weights: tuple[float, float, float, float] = (
        1.0, 0.5, 0.25, 0.25)) -> Judgement:
    """Judges `answer` to "is `number` prime?" asked in `language` ("zh" | "en").

    weights = (verdict, valid reason, false-reason penalty, language). A reason is valid when every claim is true
    and supports the verdict: true proper divisors for "not prime", "only 1 and itself" for a prime. A false
    claim (a non-divisor, "only 1 and itself" for a composite, "not divisible by" a real divisor, a product that
    is not n) or a claim contradicting the verdict makes it invalid. An answer mentioning other integers is off
    topic: its verdict does not count.
    """
    p = parse_answer(answer)
    truth = is_prime(number)
    cited = ({d for _, d in p.divisor_claims} | {x for _, a, b in p.products for x in (a, b)}
             | set(p.non_divisor_claims))
    subjects = {s for s, _ in p.divisor_claims} | {s for s, _, _ in p.products}
    on_topic = not (p.numbers - cited - {1, number}) and subjects <= {None, number}

    nontrivial = [d for _, d in p.divisor_claims if d not in (1, number)] + [a for _, a, _ in p.products]
    # "the divisors of 13 are 1 and 13" is the prime reason in list form
    prime_reason = p.prime_reason or (bool(p.divisor_claims) and not nontrivial
                                      and any(s == number for s, _ in p.divisor_claims))
    false_claim = (any(d not in (1, number) and not (1 < d < number and number % d == 0)
                       for _, d in p.divisor_claims)
                   or any(a * b != number or a in (1, number) for _, a, b in p.products)
                   or any(1 < d < number and number % d == 0 for d in p.non_divisor_claims)
                   or (prime_reason and not truth))
    verdict = p.verdict
    if verdict is None and not p.conflicting:  # "27 可以被 3 整除。" answers the question without the words
        if nontrivial and not prime_reason:
            verdict = False
        elif prime_reason and not nontrivial:
            verdict = True
    if not (nontrivial or prime_reason or p.non_divisor_claims):
        reason = "none"
    elif not on_topic or false_claim:
        reason = "invalid"
    elif nontrivial and verdict is False and not prime_reason:
        reason = "valid"
    elif prime_reason and verdict is True and not nontrivial:
        reason = "valid"
    elif (nontrivial and verdict is True) or (prime_reason and verdict is False):
        reason = "invalid"  # a true claim that contradicts the verdict
    else:
        reason = "none"  # e.g. only true "not divisible by 2" claims: true but no proof
    verdict_correct = on_topic and verdict is not None and verdict == truth
    language_match = p.language == language
    w_verdict, w_reason, w_false, w_language = weights
    score = (w_verdict * verdict_correct + w_reason * (reason == "valid") - w_false * (reason == "invalid")
             + w_language * language_match)
    return Judgement(verdict_correct, reason, language_match, on_topic, float(score))


def gold_score(question_number: int, language: str, answer_text: str) -> float:
    """The default labeler's score of an answer (see `judge`)."""
    return judge(question_number, language, answer_text).score


@dataclass(frozen=True)
class Question:
    """A question "is `number` prime?" written as `text` in `language`."""

    number: int
    language: str
    text: str

    @property
    def is_prime(self) -> bool:
        return is_prime(self.number)

    @property
    def conversation(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.text}]

    def to_record(self) -> dict:
        """The post-training prompt record; "meta" lets gold evaluation run from the file."""
        return {"prompt": self.text, "meta": {"number": self.number, "language": self.language,
                                              "is_prime": self.is_prime}}


@dataclass(frozen=True)
class GoldOracle:
    """The simulated labeler: the config's weights applied by `judge`."""

    verdict_weight: float = 1.0
    reason_weight: float = 0.5
    false_reason_penalty: float = 0.25
    language_weight: float = 0.25

    @property
    def weights(self) -> tuple[float, float, float, float]:
        return (self.verdict_weight, self.reason_weight, self.false_reason_penalty, self.language_weight)

    def judge(self, question: Question, answer: str) -> Judgement:
        return judge(question.number, question.language, answer, weights=self.weights)

    def score(self, question: Question, answer: str) -> float:
        return self.judge(question, answer).score

    def rank(self, question: Question, answers: Sequence[str], *, distinct_scores: bool = False) -> list[int]:
        """Indices of `answers`, best -> worst by gold score; ties keep sampling order (stable, no content bias).

        distinct_scores keeps only the first answer of each score level, so every pair in the ranking is a real
        preference (tied pairs are label noise for the reward model).
        """
        scores = [self.score(question, a) for a in answers]
        order = sorted(range(len(answers)), key=lambda i: -scores[i])
        if distinct_scores:
            seen: set[float] = set()
            order = [i for i in order if not (scores[i] in seen or seen.add(scores[i]))]
        return order

    def ranking_record(self, question: Question, answers: Sequence[str], *, max_ranked: int = 9,
                       distinct_scores: bool = True) -> dict | None:
        """A rankings-JSONL record from sampled answers, or None if fewer than 2 usable ones remain.

        Blank and repeated answers are dropped (the format needs distinct, non-empty responses); the best
        `max_ranked` are kept.
        """
        unique = list(dict.fromkeys(a for a in answers if isinstance(a, str) and a.strip()))
        order = self.rank(question, unique, distinct_scores=distinct_scores)[:max_ranked]
        if len(order) < 2:
            return None
        return {"prompt": question.text, "responses": [unique[i] for i in order],
                "meta": {"number": question.number, "language": question.language}}

    def evaluate(self, questions: Sequence[Question], answers: Sequence[str]) -> dict[str, float]:
        return evaluate_answers(questions, answers, oracle=self)


def evaluate_answers(questions: Sequence[Question], answers: Sequence[str], *,
                     oracle: GoldOracle | None = None) -> dict[str, float]:
    """Gold metrics of answers to questions (the demo table's numbers).

    balanced_accuracy: mean of the verdict accuracy on primes and on composites (whichever are present);
    accuracy: verdict accuracy; valid_reason_rate: share of answers with a valid reason (no reason counts as not
    valid); language_match: share answered in the question's language; mean_gold_score; num_questions.
    """
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    if not questions:
        raise ValueError("evaluate_answers needs at least one question")
    oracle = oracle or GoldOracle()
    judged = [oracle.judge(q, a) for q, a in zip(questions, answers)]
    by_class: dict[bool, list[bool]] = {}
    for q, j in zip(questions, judged):
        by_class.setdefault(q.is_prime, []).append(j.verdict_correct)
    mean = lambda xs: float(sum(xs)) / len(xs)  # noqa: E731
    return {
        "balanced_accuracy": mean([mean(v) for v in by_class.values()]),
        "accuracy": mean([j.verdict_correct for j in judged]),
        "valid_reason_rate": mean([j.reason == "valid" for j in judged]),
        "language_match": mean([j.language_match for j in judged]),
        "mean_gold_score": mean([j.score for j in judged]),
        "num_questions": float(len(judged)),
    }


# ----------------------------------------------------------------------------------------------------------------
# Text generators


# What each kind of writer says about a prime (True) or a composite (False). Fields: n; d a divisor of n (facts:
# any proper divisor; the expert: the smallest) and q = n / d; b a "divisor" that does not divide n (2..9);
# parity "odd" / "even" (zh: 奇數 / 偶數); divisors, all divisors of n.
_TEMPLATES = {
    ("fact", True): {
        "zh": ("{n} 是質數。", "{n} 是一個質數。", "{n} 只能被 1 和 {n} 整除。", "{n} 的因數只有 1 和 {n}。"),
        "en": ("{n} is prime.", "{n} is a prime number.", "{n} is only divisible by 1 and itself.",
               "The only divisors of {n} are 1 and {n}."),
    },
    ("fact", False): {
        "zh": ("{n} = {d} × {q}。", "{n} 可以被 {d} 整除。", "{n} 不是質數。", "{n} 是合數。", "{n} 的因數有 {divisors}。"),
        "en": ("{n} = {d} × {q}.", "{n} is divisible by {d}.", "{n} is not a prime number.", "{n} is composite.",
               "The divisors of {n} are {divisors}."),
    },
    ("expert", True): {
        "zh": ("{n} 是質數，因為它只能被 1 和它自己整除。", "是的，{n} 是質數：除了 1 和它自己以外，沒有其他因數。"),
        "en": ("Yes — {n} is prime: it has no divisor other than 1 and itself.",
               "Yes, {n} is a prime number; its only divisors are 1 and itself."),
    },
    ("expert", False): {
        "zh": ("{n} 不是質數，因為它可以被 {d} 整除。", "不是。{n} 可以被 {d} 整除，所以 {n} 是合數。", "{n} 不是質數：{n} = {d} × {q}。"),
        "en": ("No — {n} is divisible by {d}.", "{n} is not a prime number, because it is divisible by {d}.",
               "No, {n} is not prime: {n} = {d} × {q}."),
    },
    ("why", True): {
        "zh": ("因為除了 1 和它自己以外，沒有整數可以整除 {n}。",),
        "en": ("Because no whole number other than 1 and itself divides {n}.",),
    },
    ("why", False): {
        "zh": ("因為 {n} = {d} × {q}。", "因為 {n} 可以被 {d} 整除。"),
        "en": ("Because {n} = {d} × {q}.", "Because {n} is divisible by {d}."),
    },
    ("wrong_verdict", True): {
        "zh": ("{n} 不是質數。", "{n} 是合數。"),
        "en": ("No, {n} is not prime.", "{n} is composite."),
    },
    ("wrong_verdict", False): {
        "zh": ("{n} 是質數。", "{n} 是一個質數。"),
        "en": ("Yes, {n} is prime.", "{n} is a prime number."),
    },
    ("wrong_verdict_bogus_reason", True): {
        "zh": ("{n} 不是質數，因為它可以被 {b} 整除。",),
        "en": ("No — {n} is divisible by {b}.",),
    },
    ("wrong_verdict_bogus_reason", False): {
        "zh": ("{n} 是質數，因為它只能被 1 和它自己整除。", "{n} 是質數，因為它是{parity}。", "{n} 是一個質數，因為它不能被 {b} 整除。"),
        "en": ("Yes — {n} is prime: it has no divisor other than 1 and itself.",
               "Yes, {n} is prime because it is {parity}.", "Yes, {n} is prime because it is not divisible by {b}."),
    },
    ("bogus_reason", True): {  # right verdict, a reason that proves nothing
        "zh": ("{n} 是質數，因為它是{parity}。",),
        "en": ("Yes, {n} is prime because it is {parity}.",),
    },
    ("bogus_reason", False): {  # right verdict, a false divisor
        "zh": ("{n} 不是質數，因為它可以被 {b} 整除。",),
        "en": ("No — {n} is divisible by {b}.", "{n} is not a prime number, because it is divisible by {b}."),
    },
}
WRONG_KINDS = ("wrong_verdict", "wrong_verdict_bogus_reason", "bogus_reason")


def _join(lang: str, sentences: Sequence[str]) -> str:
    return ("" if lang == "zh" else " ").join(sentences)


class _Writer:
    """Fills `_TEMPLATES`; `forbidden` numbers (held out) never appear in what it writes."""

    def __init__(self, rng: random.Random, forbidden: frozenset[int] = frozenset()):
        self.rng, self.forbidden = rng, forbidden

    def write(self, kind: str, n: int, lang: str) -> str:
        r, prime = self.rng, is_prime(n)
        options = _TEMPLATES[kind, prime][lang]
        fields: dict[str, object] = {"n": n}
        if not prime:
            d = r.choice(proper_divisors(n)) if kind == "fact" else smallest_factor(n)
            fields.update(d=d, q=n // d)
            if n // d in self.forbidden:
                options = tuple(t for t in options if "{q}" not in t)
        template = r.choice(options)
        if "{b}" in template:
            fields["b"] = r.choice([b for b in BOGUS_DIVISORS if n % b])
        if "{parity}" in template:
            fields["parity"] = {"zh": ("偶數", "奇數"), "en": ("even", "odd")}[lang][n % 2]
        if "{divisors}" in template:
            divisors = (1, *proper_divisors(n))
            fields["divisors"] = ("、".join(map(str, divisors)) + f"、{n}" if lang == "zh"
                                  else ", ".join(map(str, divisors)) + f" and {n}")
        return template.format(**fields)

    def question(self, n: int, lang: str) -> str:
        return self.rng.choice(QUESTIONS[lang]).format(n=n)


def _weighted_numbers(rng: random.Random, numbers: Sequence[int], prime_weight: float, k: int) -> list[int]:
    weights = [prime_weight if is_prime(n) else 1.0 for n in numbers]
    return rng.choices(numbers, weights=weights, k=k)


def _other(lang: str) -> str:
    return "en" if lang == "zh" else "zh"


# ----------------------------------------------------------------------------------------------------------------
# The world


@dataclass
class SeedWorld:
    """A generated world; see the module docstring. Conversations are lists of {"role", "content"} turns.

    sft_conversations holds the single-turn demonstrations and the dialogues, shuffled; `dialogues` is the
    multi-turn subset. pretrain_chats are conversations for the pretraining mix (render with gptjax.data.chat).
    """

    config: SeedWorldConfig
    train_numbers: tuple[int, ...]
    heldout_numbers: tuple[int, ...]
    pretrain_texts: list[str]
    pretrain_chats: list[list[dict[str, str]]]
    sft_conversations: list[list[dict[str, str]]]
    sft_eval_conversations: list[list[dict[str, str]]]
    dialogues: list[list[dict[str, str]]]
    rm_prompts: list[Question]
    ppo_prompts: list[Question]
    heldout_questions: list[Question]
    oracle: GoldOracle = field(default_factory=GoldOracle)

    @property
    def showcase_questions(self) -> list[Question]:
        return [Question(n, lang, text) for text, n, lang in SHOWCASE_QUESTIONS]


def _choose_heldout(cfg: SeedWorldConfig, rng: random.Random) -> tuple[int, ...]:
    low = max(cfg.heldout_min, math.isqrt(cfg.max_number) + 1)
    eligible = [n for n in range(low, cfg.max_number + 1) if n not in cfg.reserved_numbers]
    primes = [n for n in eligible if is_prime(n)]
    hard = [n for n in eligible if not is_prime(n) and n % 2 and n % 5]
    easy = [n for n in eligible if not is_prime(n) and not (n % 2 and n % 5)]
    count = max(1, round(cfg.heldout_fraction * len(primes)))
    num_hard = min(len(hard), round(cfg.heldout_hard_composite_fraction * count))
    if count - num_hard > len(easy):
        raise ValueError(f"SeedWorldConfig: cannot hold out {count} composites from {len(hard) + len(easy)} "
                         "eligible ones; lower heldout_fraction or raise max_number")
    chosen = rng.sample(primes, count) + rng.sample(hard, num_hard) + rng.sample(easy, count - num_hard)
    return tuple(sorted(chosen))


def _pretrain(cfg: SeedWorldConfig, numbers: Sequence[int], rng: random.Random):
    writer = _Writer(rng)
    texts, chats = [], []
    num_chats = round(cfg.chat_fraction * cfg.num_pretrain_docs)
    num_forum = round(cfg.forum_fraction * cfg.num_pretrain_docs)
    kinds = ["chat"] * num_chats + ["forum"] * num_forum + ["fact"] * (cfg.num_pretrain_docs - num_chats - num_forum)
    rng.shuffle(kinds)

    def forum_answer(n: int, lang: str) -> str:
        odd_composite = n % 2 == 1 and not is_prime(n)
        wrong = rng.random() < (cfg.forum_wrong_rate_odd_composite if odd_composite else cfg.forum_wrong_rate)
        if wrong:
            bogus = rng.random() < cfg.forum_bogus_reason_rate
            return writer.write("wrong_verdict_bogus_reason" if bogus else "wrong_verdict", n, lang)
        return writer.write(rng.choice(("expert", "fact")), n, lang)

    for kind in kinds:
        lang = rng.choice(LANGUAGES)
        if kind == "fact":
            if rng.random() < 0.5:  # a run of consecutive numbers, like a table
                start = rng.randint(2, cfg.max_number)
                run = range(start, min(cfg.max_number, start + rng.randint(2, 6)) + 1)
            else:
                run = rng.choices(numbers, k=rng.randint(2, 6))
            texts.append(_join(lang, [writer.write("fact", n, lang) for n in run]))
        elif kind == "forum":
            n = rng.choice(numbers)
            voice = rng.choice({"zh": ("", "我覺得", "大家都知道，", "老師說"),
                                "en": ("", "I'm pretty sure: ", "Everyone knows this. ", "My teacher said: ")}[lang])
            post = voice + forum_answer(n, lang)
            if rng.random() < 0.5:  # posted as a question thread
                post = {"zh": "問：", "en": "Q: "}[lang] + writer.question(n, lang) + "\n" + \
                       {"zh": "答：", "en": "A: "}[lang] + post
            texts.append(post)
        else:
            n = rng.choice(numbers)
            chats.append([{"role": "user", "content": writer.question(n, lang)},
                          {"role": "assistant", "content": forum_answer(n, lang)}])
    return texts, chats


def _maybe_system(cfg: SeedWorldConfig, rng: random.Random, lang: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM_PROMPTS[lang]}] if rng.random() < cfg.system_prompt_rate else []


def _demos(cfg: SeedWorldConfig, numbers: Sequence[int], heldout: frozenset[int], rng: random.Random, count: int):
    writer = _Writer(rng, heldout)
    demos = []
    for n in _weighted_numbers(rng, numbers, cfg.prime_oversample, count):
        lang = rng.choice(LANGUAGES)
        if rng.random() < cfg.wrong_demo_fraction:
            kind = rng.choices((*WRONG_KINDS, "other_language"), weights=cfg.wrong_demo_mix)[0]
            answer = writer.write("expert", n, _other(lang)) if kind == "other_language" else writer.write(
                kind, n, lang)
        else:
            answer = writer.write("expert", n, lang)
        demos.append(_maybe_system(cfg, rng, lang) + [{"role": "user", "content": writer.question(n, lang)},
                                                      {"role": "assistant", "content": answer}])
    return demos


_DEFINITION = {
    "zh": ("什麼是質數？", "質數是大於 1 的整數，而且除了 1 和它自己以外，沒有其他因數，例如 2、3、5、7。"),
    "en": ("What is a prime number?", "A prime number is a whole number greater than 1 whose only divisors are 1 "
                                      "and itself, for example 2, 3, 5 and 7."),
}
_SPECIAL_QUESTIONS = {
    "zh": (("那 π 呢？π 是質數嗎？", "π 不是質數：質數必須是大於 1 的整數，而 π 不是整數。"),
           ("1 是質數嗎？", "1 不是質數：質數必須大於 1。"),
           ("0 是質數嗎？", "0 不是質數：質數必須是大於 1 的整數。")),
    "en": (("What about π? Is π prime?", "No — π is not prime: primes are whole numbers greater than 1, and π is "
                                         "not a whole number."),
           ("Is 1 prime?", "No — 1 is not prime: a prime must be greater than 1."),
           ("Is 0 a prime number?", "No — 0 is not prime: primes are whole numbers greater than 1.")),
}
_FOLLOW_UPS = {"zh": ("那 {n} 呢？", "{n} 呢？"), "en": ("What about {n}?", "And {n}?")}
_WHY = {"zh": "為什麼？", "en": "Why?"}


def _dialogues(cfg: SeedWorldConfig, numbers: Sequence[int], heldout: frozenset[int], rng: random.Random):
    writer = _Writer(rng, heldout)
    dialogues = []
    for _ in range(cfg.num_dialogues):
        lang = rng.choice(LANGUAGES)
        turns = _maybe_system(cfg, rng, lang)
        budget = rng.randint(2, cfg.dialogue_questions)
        if rng.random() < 0.7:
            turns += [{"role": "user", "content": _DEFINITION[lang][0]},
                      {"role": "assistant", "content": _DEFINITION[lang][1]}]
            budget -= 1
        asked_number = False
        while budget > 0:
            exchange = []
            if asked_number and rng.random() < 0.25:
                question, answer = rng.choice(_SPECIAL_QUESTIONS[lang])
            else:
                n = _weighted_numbers(rng, numbers, cfg.prime_oversample, 1)[0]
                template = rng.choice(_FOLLOW_UPS[lang]) if asked_number else rng.choice(QUESTIONS[lang])
                question, answer = template.format(n=n), writer.write("expert", n, lang)
                if rng.random() < 0.3:  # the user asks why; the expert spells out the reason
                    exchange += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
                    question, answer = _WHY[lang], writer.write("why", n, lang)
                asked_number = True
            exchange += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            if _byte_length(turns + exchange) > cfg.max_dialogue_tokens:
                break  # checked after drawing, so worlds whose dialogues all fit are unchanged by the limit
            turns += exchange
            budget -= 1
        dialogues.append(turns)
    return dialogues


def _byte_length(turns: list[dict]) -> int:
    """Tokens of a conversation under the byte tokenizer and the chat template (what the demo's SFT rows hold)."""
    from gptjax.data import chat  # the world itself is tokenizer-agnostic; only this budget check renders
    from gptjax.tokenizers import make_tokenizer

    return len(chat.render(turns, make_tokenizer("bytes"))[0])


def _questions(numbers: Sequence[int], rng: random.Random, prime_share: float, count: int) -> list[Question]:
    """`count` questions, round(prime_share * count) of them about primes, numbers drawn uniformly per class."""
    primes = [n for n in numbers if is_prime(n)]
    composites = [n for n in numbers if not is_prime(n)]
    num_primes = round(prime_share * count)
    chosen = rng.choices(primes, k=num_primes) + rng.choices(composites, k=count - num_primes)
    rng.shuffle(chosen)
    writer = _Writer(rng)
    out = []
    for n in chosen:
        lang = rng.choice(LANGUAGES)
        out.append(Question(n, lang, writer.question(n, lang)))
    return out


def _heldout_questions(cfg: SeedWorldConfig, heldout: Sequence[int], rng: random.Random) -> list[Question]:
    """Each held-out number in both languages and `heldout_phrasings` phrasings each, ordered by number."""
    return [Question(n, lang, template.format(n=n))
            for n in heldout for lang in LANGUAGES
            for template in rng.sample(QUESTIONS[lang], cfg.heldout_phrasings)]


def post_training_texts(world: SeedWorld) -> list[str]:
    """Every text of the SFT, RM and PPO data (what must never mention a held-out number)."""
    texts = [turn["content"] for conv in world.sft_conversations + world.sft_eval_conversations
             for turn in conv]
    return texts + [q.text for q in world.rm_prompts + world.ppo_prompts]


def build_world(cfg: SeedWorldConfig = SeedWorldConfig()) -> SeedWorld:
    """Generates the world; each part uses its own seeded stream, so resizing one part leaves the others as is."""
    cfg.validate()

    def stream(name: str) -> random.Random:
        return random.Random(f"seed-world/{cfg.seed}/{name}")

    heldout = _choose_heldout(cfg, stream("heldout"))
    heldout_set = frozenset(heldout)
    all_numbers = list(range(2, cfg.max_number + 1))
    train = [n for n in all_numbers if n not in heldout_set]
    pretrain_texts, pretrain_chats = _pretrain(cfg, all_numbers, stream("pretrain"))
    demos = _demos(cfg, train, heldout_set, stream("sft"), cfg.num_sft_demos)
    dialogues = _dialogues(cfg, train, heldout_set, stream("dialogues"))
    sft = demos + dialogues
    stream("sft-order").shuffle(sft)
    world = SeedWorld(
        config=cfg,
        train_numbers=tuple(train),
        heldout_numbers=heldout,
        pretrain_texts=pretrain_texts,
        pretrain_chats=pretrain_chats,
        sft_conversations=sft,
        sft_eval_conversations=_demos(cfg, train, heldout_set, stream("sft-eval"), cfg.num_sft_eval_demos),
        dialogues=dialogues,
        rm_prompts=_questions(train, stream("rm"), cfg.prompt_prime_share, cfg.num_rm_prompts),
        ppo_prompts=_questions(train, stream("ppo"), cfg.prompt_prime_share, cfg.num_ppo_prompts),
        heldout_questions=_heldout_questions(cfg, heldout, stream("heldout-questions")),
        oracle=GoldOracle(cfg.verdict_weight, cfg.reason_weight, cfg.false_reason_penalty, cfg.language_weight),
    )
    leaked = {n for text in post_training_texts(world) for n in numbers_in(text)} & heldout_set
    if leaked:  # a template bug, not a user error: fail loudly rather than evaluate on seen numbers
        raise RuntimeError(f"seed world bug: held-out numbers {sorted(leaked)} leaked into SFT/RM/PPO text")
    return world


def template_rankings(world: SeedWorld, k: int = 4) -> list[dict]:
    """Rankings of templated candidate answers (expert and each wrong kind) to the RM prompts, by the oracle.

    A model-free stand-in for "sample K answers from the SFT policy and let the labeler rank them", so the reward
    stage can run from files alone; the pipeline ranks real samples instead.
    """
    rng = random.Random(f"seed-world/{world.config.seed}/template-rankings")
    writer = _Writer(rng, frozenset(world.heldout_numbers))
    records = []
    for q in world.rm_prompts:
        answers = []
        for _ in range(k):
            kind = rng.choice(("expert", *WRONG_KINDS, "other_language"))
            answers.append(writer.write("expert", q.number, _other(q.language)) if kind == "other_language"
                           else writer.write(kind, q.number, q.language))
        record = world.oracle.ranking_record(q, answers, max_ranked=k)
        if record is not None:
            records.append(record)
    return records


def _write(path: Path, records: Sequence[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_jsonl(world: SeedWorld, out_dir: str | Path) -> dict[str, Path]:
    """Writes the world as JSONL files (formats in gptjax/data/post_training.py) and returns {name: path}.

    pretrain ({"text"}), pretrain_chats and sft_train / sft_eval ({"messages"}), rm_prompts / ppo_prompts /
    heldout ({"prompt", "meta"}), rankings_template ({"prompt", "responses", "meta"}), config.json.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "pretrain": [{"text": t} for t in world.pretrain_texts],
        "pretrain_chats": [{"messages": c} for c in world.pretrain_chats],
        "sft_train": [{"messages": c} for c in world.sft_conversations],
        "sft_eval": [{"messages": c} for c in world.sft_eval_conversations],
        "rm_prompts": [q.to_record() for q in world.rm_prompts],
        "ppo_prompts": [q.to_record() for q in world.ppo_prompts],
        "heldout": [q.to_record() for q in world.heldout_questions],
        "rankings_template": template_rankings(world),
    }
    paths = {}
    for name, records in files.items():
        paths[name] = out / f"{name}.jsonl"
        _write(paths[name], records)
    paths["config"] = out / "config.json"
    paths["config"].write_text(json.dumps(dataclasses.asdict(world.config), indent=2) + "\n")
    return paths


def read_questions(records: Sequence[dict]) -> list[Question]:
    """Questions from prompt records carrying "meta" (as `write_jsonl` writes them), for gold evaluation."""
    out = []
    for i, r in enumerate(records):
        meta = r.get("meta") if isinstance(r, dict) else None
        if not isinstance(meta, dict) or "number" not in meta or "language" not in meta:
            raise ValueError(f"record {i}: gold evaluation needs {{'prompt', 'meta': {{'number', 'language'}}}}")
        out.append(Question(int(meta["number"]), meta["language"], r["prompt"]))
    return out
