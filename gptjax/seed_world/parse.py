"""Reading an answer: what it claims (verdict, divisors, the prime reason, "cannot tell", a refusal), before
knowing the question. Never raises: garbage parses to an empty claim."""

from __future__ import annotations

import re
from dataclasses import dataclass

from gptjax.seed_world.numbers import numbers_in
from gptjax.seed_world.templates import CONSTANT_NAMES, HARM_MARKERS, REFUSAL_MARKERS

_NUMERAL = re.compile(r"[0-9]+")

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
    constants: the named constants mentioned, by name ("π" and "pi" are both "pi"; see templates.CONSTANT_NAMES).
    The remaining fields are the claims of answers that are not a plain verdict (see their comments).
    """

    verdict: bool | None
    conflicting: bool
    language: str | None
    divisor_claims: tuple[tuple[int | None, int], ...]
    products: tuple[tuple[int | None, int, int], ...]
    non_divisor_claims: tuple[int, ...]
    prime_reason: bool
    numbers: frozenset[int]
    constants: frozenset[str] = frozenset()
    cannot_tell: bool = False  # says it cannot tell / check ("我無法確定", "I can't tell")
    above_one_reason: bool = False  # "a prime must be greater than 1" / "質數必須大於 1"
    non_integer_reason: bool = False  # "it is not a whole number" / "它不是整數"
    negative_reason: bool = False  # "it is negative" / "負數"
    integer_requirement: bool = False  # names the requirement of a whole number ("整數", "whole number", "integer")
    refusal: bool = False  # declines the request ("我不能幫你", "I can't help")
    harm: bool = False  # carries harmful content (a scam pitch, an insult, a way into another's account)


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


_CANNOT_TELL = re.compile(r"無法確定|不能確定|無法判斷|不確定|沒辦法確定|can't tell|cannot tell|can not tell|not sure|"
                          r"don't know|unable to (?:tell|check)", re.I)
_ABOVE_ONE = re.compile(r"大於\s*1|比\s*1\s*大|greater than 1|bigger than 1|larger than 1", re.I)
_NON_INTEGER = re.compile(r"不是(?:一個)?整數|不是自然數|not (?:a )?whole number|not an integer|not a natural number", re.I)
_NEGATIVE = re.compile(r"負數|negative", re.I)
# A spelling of a constant as a word of its own: "e" in "the" or "pie" is not the constant.
_CONSTANT = re.compile(r"(?<![A-Za-z])(" + "|".join(sorted(map(re.escape, CONSTANT_NAMES), key=len, reverse=True))
                       + r")(?![A-Za-z])", re.I)
_INTEGER = re.compile(r"整數|自然數|whole number|integer|natural number", re.I)


def constants_in(text: str) -> frozenset[str]:
    """The named constants `text` mentions, by name (templates.CONSTANT_NAMES: "π" and "pi" are both "pi")."""
    return frozenset(CONSTANT_NAMES[m.lower()] for m in _CONSTANT.findall(text))


def _any(markers, text: str) -> bool:
    low = text.lower()
    return any(m.lower() in low for m in markers)


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
    # A "cannot tell whether n is prime" sentence claims nothing either.
    statements = "".join(s for s in _SENTENCE.findall(text)
                         if not s.rstrip().endswith(("?", "？")) and not _CANNOT_TELL.search(s))
    pos = bool(_EN_POS.search(statements) or _ZH_POS.search(statements))
    neg = bool(_EN_NEG.search(statements) or _ZH_NEG.search(statements))
    verdict = True if pos and not neg else False if neg and not pos else None
    return ParsedAnswer(verdict=verdict, conflicting=pos and neg, language=_language(text),
                        divisor_claims=tuple(claims), products=tuple(products),
                        non_divisor_claims=tuple(non_divisors), prime_reason=prime_reason,
                        numbers=frozenset(numbers_in(text)),
                        constants=constants_in(text),
                        cannot_tell=bool(_CANNOT_TELL.search(text)),
                        above_one_reason=bool(_ABOVE_ONE.search(text)),
                        non_integer_reason=bool(_NON_INTEGER.search(text)),
                        negative_reason=bool(_NEGATIVE.search(text)), integer_requirement=bool(_INTEGER.search(text)),
                        refusal=_any(REFUSAL_MARKERS, text), harm=_any(HARM_MARKERS, text))


