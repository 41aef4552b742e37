"""The seed world, "27 是不是質數？": a small bilingual world where RLHF has something to fix on three axes.

`build_world(SeedWorldConfig)` generates, deterministically and offline:

  pretraining  textbook facts ("27 = 3 × 9。", "13 is prime.", "π 不是整數。") and forum threads that repeat
               confident claims, wrong at set rates ("大家都知道，27 是質數。"), hallucinate about π, 1 or large
               numbers, and comply with harmful requests — a next-word model learns the facts and imitates both.
               No chat-format text: the pretrained model knows, but does not answer as an assistant.
  SFT          an expert's answers and multi-turn dialogues, `wrong_demo_fraction` of the answers to numbers and
               `wrong_aligned_demo_fraction` of the others wrong (labelers' mistakes), so the reward model has
               something to learn and PPO something to fix.
  prompts      RM / PPO prompts about training numbers (half primes, half of the composites hard), special
               values, harmful and benign requests, and multi-turn contexts.
  held-out     numbers that appear only in pretraining (per class: primes, easy and hard composites), special
               values and large numbers never in post-training text, and phrasings of questions and requests that
               post-training never used: the gold evaluation sets.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gptjax.seed_world import templates as T
from gptjax.seed_world.config import SeedWorldConfig
from gptjax.seed_world.labeler import GoldOracle, Question
from gptjax.seed_world.numbers import is_prime, number_class, numbers_in
from gptjax.data import chat
from gptjax.tokenizers import make_tokenizer, number_options_path, train_sentencepiece

SHOWCASE = (("27 是不是質數？", 27, "zh"), ("Is 27 a prime number?", 27, "en"))
# The talk's dialogues: "what is a prime? -> is 27? -> and 91? -> why?" and "what is a prime? -> is 27? -> is pi?".
SEED_DIALOGUES = {
    "zh": (("什麼是一個質數？", "27 是質數嗎？", "那 91 呢？", "為什麼？"), ("什麼是一個質數？", "27 是質數嗎？", "pi 是一個質數嗎？")),
    "en": (("What is a prime number?", "Is 27 prime?", "What about 91?", "Why?"),
           ("What is a prime number?", "Is 27 prime?", "Is pi a prime number?")),
}
SYSTEM_PROMPTS = {"zh": "你是一位細心的數學老師。", "en": "You are a careful math tutor."}


@dataclass(frozen=True)
class Special:
    """A value whose primality question has no bare-verdict answer: 0, 1, -7, π, 2.5, 3/4, 4738 …"""

    value: str
    kind: str  # labeler.SPECIAL_KINDS

    def question(self, text: str, lang: str) -> Question:
        return Question("special", lang, text, value=self.value, special=self.kind)


@dataclass
class SeedWorld:
    """A generated world (see the module docstring). Conversations are lists of {"role", "content"} turns."""

    config: SeedWorldConfig
    train_numbers: tuple[int, ...]
    heldout_numbers: tuple[int, ...]
    specials: dict[str, list[Special]]  # "train" / "heldout"
    pretrain_texts: list[str]
    sft_conversations: list[list[dict[str, str]]]
    sft_eval_conversations: list[list[dict[str, str]]]
    rm_prompts: list[Question]
    ppo_prompts: list[Question]
    heldout_questions: list[Question]  # "is n prime?", held-out numbers and phrasings
    train_questions: list[Question]  # "is n prime?", training numbers, train phrasings
    heldout_specials: list[Question]
    heldout_requests: list[Question]  # harmful and benign, held-out phrasings
    heldout_dialogues: list[list[tuple[str, Question]]]  # per dialogue: (user text, question to judge) per turn
    oracle: GoldOracle = field(default_factory=GoldOracle)

    @property
    def showcase_questions(self) -> list[Question]:
        return [Question("number", lang, text, number=n) for text, n, lang in SHOWCASE]

    def seed_dialogues(self) -> list[list[tuple[str, Question]]]:
        """The talk's own dialogues in both languages, each turn with what the labeler judges."""
        out = []
        for lang in ("zh", "en"):
            for texts in SEED_DIALOGUES[lang]:
                turns = [Question("definition", lang, texts[0]), Question("number", lang, texts[1], number=27)]
                if len(texts) == 4:
                    turns += [Question("number", lang, texts[2], number=91), Question("why", lang, texts[3], number=91)]
                else:
                    turns.append(Question("special", lang, texts[2], value="pi", special="non_integer"))
                out.append([(q.text, q) for q in turns])
        return out


# --- numbers and special values ---------------------------------------------------------------------------------

def number_pieces(text: str, max_number: int, number_tokens: str = "whole") -> list[str]:
    """How the world's tokenizer splits a run of digits (SeedWorldConfig.number_tokens): greedy longest pieces among
    "0".."max_number" ("whole"), one per digit ("digits"), or one piece in range and digits beyond
    ("whole_in_range": as the tokenizer's long_numbers="digits", a run of several whole pieces becomes digits)."""
    if number_tokens == "digits":
        return list(text)
    pieces, i = [], 0
    while i < len(text):
        j = next(j for j in range(len(text), i, -1)
                 if text[i:j] == "0" or (text[i] != "0" and int(text[i:j]) <= max_number) or j == i + 1)
        pieces.append(text[i:j])
        i = j
    return list(text) if number_tokens == "whole_in_range" and len(pieces) > 1 else pieces


def _choose_heldout(cfg: SeedWorldConfig, rng: random.Random) -> tuple[int, ...]:
    low = max(cfg.heldout_min, math.isqrt(cfg.max_number) + 1)
    eligible = [n for n in range(low, cfg.max_number + 1) if n not in cfg.reserved_numbers]
    chosen = []
    for cls, count in zip(("prime", "easy", "hard"), cfg.heldout_per_class):
        pool = [n for n in eligible if number_class(n) == cls]
        if count > len(pool) // 2:
            raise ValueError(f"SeedWorldConfig.heldout_per_class: {count} {cls} numbers held out of {len(pool)} "
                             f"eligible leaves too few for training; lower it or raise max_number")
        chosen += rng.sample(pool, count)
    return tuple(sorted(chosen))


def _specials(cfg: SeedWorldConfig, train: Sequence[int], heldout: Sequence[int], rng: random.Random):
    """Special values per split: held-out ones are built on held-out numbers (or are new), so their digits never
    appear in post-training text."""
    heldout_set = frozenset(heldout)
    out = {}
    for split, base in (("train", list(train)), ("heldout", list(heldout))):
        values = [Special("0", "below_two"), Special("1", "below_two")]
        num_negative = min(len(base), 24 if split == "train" else 8)
        values += [Special(f"-{k}", "negative") for k in rng.sample(base, num_negative)]
        values += [Special(c, "non_integer") for c in T.CONSTANTS[split]]
        values += [Special(f"{a}.{rng.randint(1, 9)}", "non_integer") for a in rng.sample(base, 6)]
        values += [Special(f"{a}/{b}", "non_integer") for a in rng.sample(base, 4) for b in [rng.choice(
            [b for b in range(2, 10) if a % b])]]
        out[split] = values
    large_pool = list(range(1000, 10000))
    heldout_large = rng.sample(large_pool, cfg.heldout_large)
    taken = set(heldout_large)
    train_large = [n for n in rng.sample(large_pool, 400) if n not in taken and not any(
        int(p) in heldout_set for p in number_pieces(str(n), cfg.max_number, cfg.number_tokens))][:96]
    out["heldout"] += [Special(str(n), "large") for n in heldout_large]
    out["train"] += [Special(str(n), "large") for n in train_large]
    return out


# --- pretraining: textbook and forum ----------------------------------------------------------------------------

def _textbook(cfg: SeedWorldConfig, writer: T.Writer, rng: random.Random, specials) -> str:
    lang = rng.choice(T.LANGUAGES)
    if rng.random() < cfg.textbook_special_fraction:
        every = specials["train"] + specials["heldout"]
        pick = lambda kind: rng.choice([s.value for s in every if s.kind == kind])  # noqa: E731
        consts = [s.value for s in every if s.kind == "non_integer" and not any(ch.isdigit() for ch in s.value)]
        fields = {"c": rng.choice(consts), "x": pick("non_integer"), "m": pick("negative")}
        sentences = rng.sample(T.SPECIAL_FACTS[lang], 3)
        return T.join(lang, [s.format(**fields) for s in sentences])
    if rng.random() < 0.5:  # a run of consecutive numbers, like a table
        start = rng.randint(2, cfg.max_number)
        run = range(start, min(cfg.max_number, start + rng.randint(2, 6)) + 1)
    else:
        run = [rng.randint(2, cfg.max_number) for _ in range(rng.randint(2, 6))]
    return T.join(lang, [writer.fact(n, lang) for n in run])


_VOICES = {"zh": ("", "我覺得", "大家都知道，", "老師說"), "en": ("", "I'm pretty sure: ", "Everyone knows this. ",
                                                         "My teacher said: ")}


def _forum(cfg: SeedWorldConfig, writer: T.Writer, rng: random.Random, specials) -> str:
    lang = rng.choice(T.LANGUAGES)
    r = rng.random()
    if r < cfg.forum_request_fraction:
        harmful = rng.random() < 0.6
        kind = "harmful" if harmful else "benign"
        cat = rng.choice(sorted(T.REQUESTS[kind]))
        request = rng.choice(T.request_phrasings(kind, cat, rng.choice(T.SPLITS), lang, cfg.composed_requests))
        if harmful:
            answer = rng.choice(T.COMPLIANCE[cat][lang] if rng.random() < cfg.forum_compliance_rate
                                else T.REFUSALS[cat][lang])
        else:
            answer = rng.choice(T.BENIGN_ANSWERS[cat][lang])
        return T.FORUM_PROMPT[lang].format(q=request) + answer
    voice = rng.choice(_VOICES[lang])
    if r < cfg.forum_request_fraction + cfg.forum_special_fraction:
        s = pick_special(rng, specials["train"] + specials["heldout"])
        if rng.random() < cfg.forum_hallucination_rate:
            answer = writer.pick(T.HALLUCINATED[lang], v=s.value, b=rng.choice((3, 7)))
        else:
            answer = honest_answer(writer, s, lang)
        return T.FORUM_PROMPT[lang].format(q=writer.question(s.value, lang, rng.choice(T.SPLITS))) + voice + answer
    n = rng.randint(2, cfg.max_number)
    hard = number_class(n) == "hard"
    if rng.random() < (cfg.forum_wrong_rate_hard if hard else cfg.forum_wrong_rate):
        kind = "wrong_verdict_bogus_reason" if rng.random() < cfg.forum_bogus_reason_rate else "wrong_verdict"
        answer = writer.wrong(kind, n, lang)
    else:
        answer = writer.expert(n, lang) if rng.random() < 0.5 else writer.fact(n, lang)
    post = voice + answer
    if rng.random() < 0.5:  # posted as a question thread
        post = T.FORUM_PROMPT[lang].format(q=writer.question(n, lang, rng.choice(T.SPLITS))) + post
    return post


def _worksheet(cfg: SeedWorldConfig, writer: T.Writer, rng: random.Random, specials) -> str:
    """A textbook's exercises with their answers, in the textbook's words: the question's number restated in a true
    answer (plain text that copies a number from a question into its answer, for every number)."""
    lang = rng.choice(T.LANGUAGES)
    items = []
    for _ in range(rng.randint(2, 4)):
        if rng.random() < 0.2:  # never a large number: the world states nothing about numbers beyond its range
            s = pick_special(rng, specials["train"] + specials["heldout"], exclude=("large",))
            answer = writer.pick(T.WORKSHEET_ANSWERS[s.kind][lang], v=s.value)
            items.append((writer.question(s.value, lang, rng.choice(T.SPLITS)), answer))
        else:
            n = rng.randint(2, cfg.max_number)
            items.append((writer.question(n, lang, rng.choice(T.SPLITS)), writer.worksheet(n, lang)))
    return "\n".join(T.WORKSHEET[lang].format(q=q, a=a) for q, a in items)


def _pretrain(cfg: SeedWorldConfig, rng: random.Random, specials) -> list[str]:
    writer = T.Writer(rng)
    num_forum = round(cfg.forum_fraction * cfg.num_pretrain_docs)
    num_worksheets = round(cfg.worksheet_fraction * cfg.num_pretrain_docs)
    kinds = (["forum"] * num_forum + ["worksheet"] * num_worksheets
             + ["textbook"] * (cfg.num_pretrain_docs - num_forum - num_worksheets))
    rng.shuffle(kinds)
    make = {"forum": _forum, "worksheet": _worksheet, "textbook": _textbook}
    return [make[kind](cfg, writer, rng, specials) for kind in kinds]


# --- the expert's answers ---------------------------------------------------------------------------------------

def pick_special(rng: random.Random, specials: Sequence[Special], exclude: tuple[str, ...] = (),
                 large_weight: float = 1.0) -> Special:
    """A special value, its kind drawn first (uniformly, numbers beyond the range weighing `large_weight`): the
    kinds have very different numbers of values (two below two, dozens of large numbers), and each must be learned."""
    kinds = sorted({s.kind for s in specials} - set(exclude))
    if large_weight == 1.0:  # the unweighted draw: worlds built before the weight existed stay byte for byte
        kind = rng.choice(kinds)
    else:
        kind = rng.choices(kinds, weights=[large_weight if k == "large" else 1.0 for k in kinds])[0]
    return rng.choice([s for s in specials if s.kind == kind])


def honest_answer(writer: T.Writer, s: Special, lang: str, check_large: bool = True) -> str:
    """The expert's answer to a special value. A number beyond the range gets the divisor its last digit shows
    (2 or 5) or, if none (or not `check_large`), "I can't tell"."""
    if s.kind != "large":
        return writer.pick(T.HONEST[s.kind][lang], v=s.value)
    n = int(s.value)
    d = (2 if n % 2 == 0 else 5 if n % 5 == 0 else None) if check_large else None
    return writer.pick(T.HONEST["large_divisible" if d else "large_unknown"][lang], v=s.value, d=d)


def _maybe_system(cfg: SeedWorldConfig, rng: random.Random, lang: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM_PROMPTS[lang]}] if rng.random() < cfg.system_prompt_rate else []


def _exchange(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _number_demo(cfg, writer: T.Writer, rng: random.Random, n: int, lang: str) -> str:
    if rng.random() >= cfg.wrong_demo_fraction:
        return writer.expert(n, lang)
    kind = rng.choices((*T.WRONG_KINDS, "other_language"), weights=cfg.wrong_demo_mix)[0]
    return writer.expert(n, T.other_language(lang)) if kind == "other_language" else writer.wrong(kind, n, lang)


def _demos(cfg: SeedWorldConfig, numbers: Sequence[int], specials: Sequence[Special], heldout: frozenset[int],
           rng: random.Random, scale: float = 1.0) -> list[list[dict[str, str]]]:
    """Single-turn demonstrations of every kind; `scale` sizes an evaluation set of the same distribution."""
    writer = T.Writer(rng, heldout)
    demos = []
    for n in _weighted_numbers(rng, numbers, cfg.prime_oversample, round(scale * cfg.num_sft_demos)):
        lang = rng.choice(T.LANGUAGES)
        demos.append(_maybe_system(cfg, rng, lang) + _exchange(writer.question(n, lang),
                                                               _number_demo(cfg, writer, rng, n, lang)))
    for _ in range(round(scale * cfg.num_special_demos)):
        s, lang = pick_special(rng, specials, large_weight=cfg.large_weight), rng.choice(T.LANGUAGES)
        wrong = rng.random() < cfg.wrong_aligned_demo_fraction
        answer = (writer.pick(T.HALLUCINATED[lang], v=s.value, b=rng.choice((3, 7))) if wrong
                  else honest_answer(writer, s, lang, check_large=cfg.large_answer == "check"))
        demos.append(_maybe_system(cfg, rng, lang) + _exchange(writer.question(s.value, lang), answer))
    for kind, count, good, bad in (("harmful", cfg.num_harmful_demos, T.REFUSALS, T.COMPLIANCE),
                                   ("benign", cfg.num_benign_demos, T.BENIGN_ANSWERS, None)):
        for _ in range(round(scale * count)):
            cat, lang = rng.choice(sorted(T.REQUESTS[kind])), rng.choice(T.LANGUAGES)
            wrong = rng.random() < cfg.wrong_aligned_demo_fraction
            answer = rng.choice((bad[cat] if bad else T.OVER_REFUSAL)[lang] if wrong else good[cat][lang])
            system = _maybe_system(cfg, rng, lang)
            request = rng.choice(T.request_phrasings(kind, cat, "train", lang, cfg.composed_requests))
            demos.append(system + _exchange(request, answer))
    return demos


def _dialogue(cfg: SeedWorldConfig, writer: T.Writer, rng: random.Random, numbers, specials, lang: str):
    """One multi-turn SFT dialogue: maybe the definition, then numbers with follow-ups, "why?" and specials."""
    turns = _maybe_system(cfg, rng, lang)
    budget = rng.randint(2, cfg.dialogue_questions)
    if rng.random() < 0.7:
        turns += _exchange(rng.choice(T.DEFINITION_QUESTIONS["train"][lang]), rng.choice(T.DEFINITION_ANSWERS[lang]))
        budget -= 1
    asked = False
    while budget > 0:
        exchange = []
        if asked and rng.random() < cfg.dialogue_special_rate:
            s = pick_special(rng, specials, exclude=("large",))
            exchange = _exchange(writer.question(s.value, lang), honest_answer(writer, s, lang))
        else:
            n = _weighted_numbers(rng, numbers, cfg.prime_oversample, 1)[0]
            template = rng.choice(T.FOLLOW_UPS["train"][lang] if asked else T.NUMBER_QUESTIONS["train"][lang])
            exchange = _exchange(template.format(n=n), writer.expert(n, lang))
            if rng.random() < cfg.dialogue_why_rate:  # the user asks why; the expert spells out the reason
                exchange += _exchange(rng.choice(T.WHY["train"][lang]), writer.why(n, lang))
            asked = True
        if _byte_tokens(turns + exchange) > cfg.max_dialogue_tokens:
            break  # checked after drawing, so worlds whose dialogues all fit are unchanged by the limit
        turns += exchange
        budget -= 1
    return turns


def _byte_tokens(turns: list[dict]) -> int:
    """Tokens of a conversation under the byte tokenizer and the chat template: an upper bound on its length under
    any of the project's tokenizers."""
    return len(chat.render(turns, _BYTES)[0])


_BYTES = make_tokenizer("bytes")


def _weighted_numbers(rng: random.Random, numbers: Sequence[int], prime_weight: float, k: int) -> list[int]:
    weights = [prime_weight if is_prime(n) else 1.0 for n in numbers]
    return rng.choices(numbers, weights=weights, k=k)


# --- prompts for the reward model and PPO -----------------------------------------------------------------------

def _number_prompts(cfg: SeedWorldConfig, numbers: Sequence[int], rng: random.Random, count: int) -> list[int]:
    """`count` numbers: exactly round(prime_share·count) primes, and hard composites `prompt_hard_share` of the rest."""
    by_class = {c: [n for n in numbers if number_class(n) == c] for c in ("prime", "easy", "hard")}
    primes = round(cfg.prompt_prime_share * count)
    hard = round(cfg.prompt_hard_share * (count - primes))
    chosen = (rng.choices(by_class["prime"], k=primes) + rng.choices(by_class["hard"], k=hard)
              + rng.choices(by_class["easy"], k=count - primes - hard))
    rng.shuffle(chosen)
    return chosen


def _context_prompt(cfg, writer: T.Writer, rng: random.Random, numbers, specials, lang: str) -> Question:
    """A multi-turn prompt: one expert exchange about a number, then a follow-up, a "why?" or a special question."""
    n = _weighted_numbers(rng, numbers, cfg.prime_oversample, 1)[0]
    # One earlier exchange: enough to make a follow-up or "why?" mean something, and short (every prompt of a
    # batch is padded to the longest; the SFT dialogues teach longer histories).
    context = [("user", writer.question(n, lang)), ("assistant", writer.expert(n, lang))]
    r = rng.random()
    if r < 0.4:
        m = _number_prompts(cfg, numbers, rng, 1)[0]
        return Question("number", lang, rng.choice(T.FOLLOW_UPS["train"][lang]).format(n=m), number=m,
                        context=tuple(context))
    if r < 0.7:
        return Question("why", lang, rng.choice(T.WHY["train"][lang]), number=n, context=tuple(context))
    s = pick_special(rng, specials, exclude=("large",))
    return dataclasses.replace(s.question(writer.question(s.value, lang), lang), context=tuple(context))


def _prompts(cfg: SeedWorldConfig, numbers, specials, heldout: frozenset[int], rng: random.Random,
             count: int) -> list[Question]:
    """RM / PPO prompts in the shares of `prompt_mix` (number, special, harmful, benign, multi-turn)."""
    writer = T.Writer(rng, heldout)
    counts = [round(share / sum(cfg.prompt_mix) * count) for share in cfg.prompt_mix]
    counts[0] = count - sum(counts[1:])
    out = []
    for n in _number_prompts(cfg, numbers, rng, counts[0]):
        lang = rng.choice(T.LANGUAGES)
        out.append(Question("number", lang, writer.question(n, lang), number=n))
    for _ in range(counts[1]):
        s = pick_special(rng, specials, large_weight=cfg.large_weight * cfg.prompt_large_boost)
        lang = rng.choice(T.LANGUAGES)
        out.append(s.question(writer.question(s.value, lang), lang))
    composed = cfg.composed_requests or cfg.composed_prompts
    for kind, k in (("harmful", counts[2]), ("benign", counts[3])):
        for _ in range(k):
            cat, lang = rng.choice(sorted(T.REQUESTS[kind])), rng.choice(T.LANGUAGES)
            request = rng.choice(T.request_phrasings(kind, cat, "train", lang, composed))
            out.append(Question(kind, lang, request, category=cat))
    definitions = round(cfg.definition_prompts * counts[4])
    out += [_context_prompt(cfg, writer, rng, numbers, specials, rng.choice(T.LANGUAGES))
            for _ in range(counts[4] - definitions)]
    for lang in (rng.choice(T.LANGUAGES) for _ in range(definitions)):
        out.append(Question("definition", lang, rng.choice(T.DEFINITION_QUESTIONS["train"][lang])))
    rng.shuffle(out)
    return out


# --- evaluation sets ----------------------------------------------------------------------------------------------

def _number_questions(numbers: Sequence[int], split: str, rng: random.Random, per_language: int) -> list[Question]:
    return [Question("number", lang, template.format(n=n), number=n)
            for n in numbers for lang in T.LANGUAGES
            for template in rng.sample(T.NUMBER_QUESTIONS[split][lang], per_language)]


def _train_eval_numbers(cfg: SeedWorldConfig, train: Sequence[int], rng: random.Random) -> list[int]:
    chosen = []
    for cls in ("prime", "easy", "hard"):
        pool = [n for n in train if number_class(n) == cls]
        chosen += rng.sample(pool, min(len(pool), cfg.train_eval_per_class))
    return sorted(chosen)


def _heldout_requests(rng: random.Random) -> list[Question]:
    return [Question(kind, lang, text, category=cat)
            for kind, table in T.REQUESTS.items()
            for cat in sorted(table) for lang in T.LANGUAGES for text in table[cat]["heldout"][lang]]


def _heldout_dialogues(heldout: Sequence[int], specials, rng: random.Random, count: int):
    """Dialogues in the seed's style on held-out numbers and phrasings: definition → n → follow-up m → why →
    (a special value)."""
    out = []
    for i in range(count):
        lang = T.LANGUAGES[i % 2]
        n, m = rng.sample(list(heldout), 2)
        s = rng.choice([s for s in specials if s.kind != "large"])
        turns = [Question("definition", lang, rng.choice(T.DEFINITION_QUESTIONS["heldout"][lang])),
                 Question("number", lang, rng.choice(T.NUMBER_QUESTIONS["heldout"][lang]).format(n=n), number=n),
                 Question("number", lang, rng.choice(T.FOLLOW_UPS["heldout"][lang]).format(n=m), number=m),
                 Question("why", lang, rng.choice(T.WHY["heldout"][lang]), number=m),
                 s.question(rng.choice(T.NUMBER_QUESTIONS["heldout"][lang]).format(n=s.value), lang)]
        out.append([(q.text, q) for q in turns])
    return out


# --- the world ----------------------------------------------------------------------------------------------------

def post_training_texts(world: SeedWorld) -> list[str]:
    """Every text of the SFT, RM and PPO data (what must never mention a held-out number or value)."""
    texts = [turn["content"] for conv in world.sft_conversations + world.sft_eval_conversations for turn in conv]
    return texts + [turn["content"] for q in world.rm_prompts + world.ppo_prompts for turn in q.conversation]


def build_world(cfg: SeedWorldConfig = SeedWorldConfig()) -> SeedWorld:
    """Generates the world; each part uses its own seeded stream, so resizing one part leaves the others as is."""
    cfg.validate()

    def stream(name: str) -> random.Random:
        return random.Random(f"seed-world/{cfg.seed}/{name}")

    heldout = _choose_heldout(cfg, stream("heldout"))
    heldout_set = frozenset(heldout)
    train = [n for n in range(2, cfg.max_number + 1) if n not in heldout_set]
    specials = _specials(cfg, train, heldout, stream("specials"))
    dialogue_rng = stream("dialogues")
    dialogue_writer = T.Writer(dialogue_rng, heldout_set)
    dialogues = [_dialogue(cfg, dialogue_writer, dialogue_rng, train, specials["train"],
                           dialogue_rng.choice(T.LANGUAGES))
                 for _ in range(cfg.num_dialogues)]
    sft = _demos(cfg, train, specials["train"], heldout_set, stream("sft")) + dialogues
    stream("sft-order").shuffle(sft)
    eval_rng = stream("eval")
    heldout_specials = [s.question(eval_rng.choice(T.NUMBER_QUESTIONS["heldout"][lang]).format(n=s.value), lang)
                        for s in specials["heldout"] for lang in T.LANGUAGES]
    world = SeedWorld(
        config=cfg, train_numbers=tuple(train), heldout_numbers=heldout, specials=specials,
        pretrain_texts=_pretrain(cfg, stream("pretrain"), specials),
        sft_conversations=sft,
        sft_eval_conversations=_demos(cfg, train, specials["train"], heldout_set, stream("sft-eval"),
                                      scale=cfg.num_sft_eval_demos / max(cfg.num_sft_demos, 1)),
        rm_prompts=_prompts(cfg, train, specials["train"], heldout_set, stream("rm"), cfg.num_rm_prompts),
        ppo_prompts=_prompts(cfg, train, specials["train"], heldout_set, stream("ppo"), cfg.num_ppo_prompts),
        heldout_questions=_number_questions(heldout, "heldout", eval_rng, len(T.NUMBER_QUESTIONS["heldout"]["zh"])),
        train_questions=_number_questions(_train_eval_numbers(cfg, train, eval_rng), "train", eval_rng, 2),
        heldout_specials=heldout_specials, heldout_requests=_heldout_requests(eval_rng),
        heldout_dialogues=_heldout_dialogues(heldout, specials["heldout"], eval_rng, 16),
    )
    _check_no_leak(world, heldout_set)
    return world


def _check_no_leak(world: SeedWorld, heldout: frozenset[int]) -> None:
    """A template bug, not a user error: fail loudly rather than evaluate on what post-training saw."""
    texts = post_training_texts(world)
    leaked = {n for text in texts for n in numbers_in(text)} & heldout
    heldout_values = {s.value for s in world.specials["heldout"] if s.kind != "below_two"}
    seen_values = {v for text in texts for v in heldout_values if v in text}
    phrasings = {t.split("{n}")[0] for split in ("heldout",) for lang in T.LANGUAGES
                 for t in T.NUMBER_QUESTIONS[split][lang] if t.split("{n}")[0].strip()}
    if leaked or seen_values:
        raise RuntimeError(f"seed world bug: held-out numbers {sorted(leaked)} / values {sorted(seen_values)} "
                           "leaked into SFT/RM/PPO text")
    del phrasings


def train_tokenizer(world: SeedWorld, out_dir: str | Path, pieces: int, dummy_prefix: bool = False) -> str:
    """The world's tokenizer, trained once into OUT_DIR/tokenizer.model: SentencePiece BPE of `pieces` pieces over the
    pretraining corpus; numbers as `config.number_tokens` says (by default every integer 0..max_number a piece of
    its own, numbers beyond read as several).

    Pretraining text only, as a GPT's tokenizer is made: changing the post-training data leaves the tokenizer, and so
    the pretraining run, as they were. Post-training text is spelled in its pieces; characters the corpus never holds
    fall back to bytes, and some words come out as BPE's intermediate pieces, which the corpus always spells merged
    ("orry" of "Sorry"): those rows, like the bytes', pretraining never trains (fine-tuning does:
    optim.trainable_token_ids). With `dummy_prefix` (train_sentencepiece) an answer's first word is the piece the
    corpus spells after a space."""
    path = Path(out_dir) / "tokenizer.model"
    if not path.exists():
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:  # never a half-written model at the final path
            spelling = world.config.number_tokens
            whole = world.config.max_number + 1 if spelling != "digits" else 0
            long_numbers = "digits" if spelling == "whole_in_range" else "pieces"
            trained = train_sentencepiece(iter(world.pretrain_texts), pieces, os.path.join(tmp, "tokenizer"),
                                          model_type="bpe", whole_numbers=whole, long_numbers=long_numbers,
                                          dummy_prefix=dummy_prefix)
            trained_options, options = number_options_path(trained), number_options_path(str(path))
            if os.path.exists(trained_options):  # beside the model, or none: a stale one goes
                os.replace(trained_options, options)
            elif os.path.exists(options):
                os.remove(options)
            os.replace(trained, path)
    return str(path)


def world_files(world: SeedWorld) -> dict[str, str]:
    """{file name: JSONL text} of the world in the post-training formats (gptjax/data/post_training.py): pretrain
    ({"text"}), sft_train / sft_eval ({"messages"}), rm_prompts / ppo_prompts / heldout* ({"prompt", "meta"})."""
    records = {
        "pretrain": [{"text": t} for t in world.pretrain_texts],
        "sft_train": [{"messages": c} for c in world.sft_conversations],
        "sft_eval": [{"messages": c} for c in world.sft_eval_conversations],
        "rm_prompts": [q.to_record() for q in world.rm_prompts],
        "ppo_prompts": [q.to_record() for q in world.ppo_prompts],
        "heldout": [q.to_record() for q in world.heldout_questions + world.heldout_specials + world.heldout_requests],
    }
    return {name: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rs) for name, rs in records.items()}


def write_jsonl(world: SeedWorld, out_dir: str | Path, files: dict[str, str] | None = None) -> dict[str, Path]:
    """Writes world_files (``files`` if given: the same, already built) as OUT_DIR/<name>.jsonl, and config.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, text in (files or world_files(world)).items():
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text(text, encoding="utf-8")
    paths["config"] = out / "config.json"
    paths["config"].write_text(json.dumps(dataclasses.asdict(world.config), indent=2) + "\n")
    return paths
