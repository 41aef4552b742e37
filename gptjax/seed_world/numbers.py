"""Arithmetic of the seed world: primality, divisors, the three classes of numbers, numbers in text."""

from __future__ import annotations

import functools
import math
import re

CLASSES = ("prime", "easy", "hard")
"""prime; easy composite (even or a multiple of 5: the last digit shows it); hard composite (odd, not a multiple
of 5, e.g. 27, 91: looks prime to a last-digit rule)."""


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


def same_verdict_other(n: int, candidates, rng) -> int:
    """One of `candidates` other than n that is prime iff n is (`rng.choice`, in the candidates' order): the subject
    of a topic pair's second answer, right about itself and off topic for n."""
    return rng.choice([m for m in candidates if m != n and is_prime(m) == is_prime(n)])


def number_class(n: int) -> str:
    """"prime", "easy" (even or a multiple of 5) or "hard" (odd, not a multiple of 5) for n >= 2."""
    if is_prime(n):
        return "prime"
    return "hard" if n % 2 and n % 5 else "easy"


def last_digit_rule(n: int) -> bool:
    """The shortcut a next-word model picks up first: "prime" iff n is 2, 5 or odd and not a multiple of 5."""
    return n in (2, 5) or bool(n % 2 and n % 5)


_NUMERAL = re.compile(r"[0-9]+")


def numbers_in(text: str) -> set[int]:
    """Every integer written with ASCII digits in `text` (digit boundaries, so "27是" and "(27)" both count)."""
    return {int(m) for m in _NUMERAL.findall(text)}
