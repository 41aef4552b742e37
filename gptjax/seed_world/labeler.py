"""The seed world's labeler: number facts, what an answer claims (``parse_answer``), how the labeler judges it
against the truth (``judge``: right verdict +1, valid reason +0.5, false reason -0.25, answer in the question's
language +0.25), and ``GoldOracle``, which scores, ranks and evaluates answers to ``Question``s."""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

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
