"""The seed world's texts: the questions, the writers' sentence templates (facts, the expert, forum claims right
and wrong) and the dialogue turns, and ``Writer``, which fills them in."""

from __future__ import annotations

import random
from collections.abc import Sequence

from gptjax.seed_world.labeler import is_prime, proper_divisors, smallest_factor

LANGUAGES = ("zh", "en")

ZH_QUESTIONS = ("{n} 是不是質數？", "{n} 是質數嗎？", "請問 {n} 是質數嗎？", "{n} 是一個質數嗎？")
EN_QUESTIONS = ("Is {n} a prime number?", "Is {n} prime?", "Is {n} a prime?", "Is the number {n} prime?")
QUESTIONS = {"zh": ZH_QUESTIONS, "en": EN_QUESTIONS}
SHOWCASE_QUESTIONS = (("27 是不是質數？", 27, "zh"), ("Is 27 a prime number?", 27, "en"))

SYSTEM_PROMPTS = {"zh": "你是一位細心的數學老師。", "en": "You are a careful math tutor."}
BOGUS_DIVISORS = range(2, 10)  # "divisible by d" claims in wrong answers; never held out (heldout_min >= 10)





# What each kind of writer says about a prime (True) or a composite (False). Fields: n; d a divisor of n (facts:
# any proper divisor; the expert: the smallest) and q = n / d; b a "divisor" that does not divide n (2..9);
# parity "odd" / "even" (zh: 奇數 / 偶數); divisors, all divisors of n.
TEMPLATES = {
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


def join_sentences(lang: str, sentences: Sequence[str]) -> str:
    return ("" if lang == "zh" else " ").join(sentences)


class Writer:
    """Fills `TEMPLATES`; `forbidden` numbers (held out) never appear in what it writes."""

    def __init__(self, rng: random.Random, forbidden: frozenset[int] = frozenset()):
        self.rng, self.forbidden = rng, forbidden

    def write(self, kind: str, n: int, lang: str) -> str:
        r, prime = self.rng, is_prime(n)
        options = TEMPLATES[kind, prime][lang]
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


def weighted_numbers(rng: random.Random, numbers: Sequence[int], prime_weight: float, k: int) -> list[int]:
    weights = [prime_weight if is_prime(n) else 1.0 for n in numbers]
    return rng.choices(numbers, weights=weights, k=k)


def other_language(lang: str) -> str:
    return "en" if lang == "zh" else "zh"


DEFINITION = {
    "zh": ("什麼是質數？", "質數是大於 1 的整數，而且除了 1 和它自己以外，沒有其他因數，例如 2、3、5、7。"),
    "en": ("What is a prime number?", "A prime number is a whole number greater than 1 whose only divisors are 1 "
                                      "and itself, for example 2, 3, 5 and 7."),
}
SPECIAL_QUESTIONS = {
    "zh": (("那 π 呢？π 是質數嗎？", "π 不是質數：質數必須是大於 1 的整數，而 π 不是整數。"),
           ("1 是質數嗎？", "1 不是質數：質數必須大於 1。"),
           ("0 是質數嗎？", "0 不是質數：質數必須是大於 1 的整數。")),
    "en": (("What about π? Is π prime?", "No — π is not prime: primes are whole numbers greater than 1, and π is "
                                         "not a whole number."),
           ("Is 1 prime?", "No — 1 is not prime: a prime must be greater than 1."),
           ("Is 0 a prime number?", "No — 0 is not prime: primes are whole numbers greater than 1.")),
}
FOLLOW_UPS = {"zh": ("那 {n} 呢？", "{n} 呢？"), "en": ("What about {n}?", "And {n}?")}
WHY = {"zh": "為什麼？", "en": "Why?"}
