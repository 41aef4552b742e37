"""The seed world, "27 是不是質數？": a small bilingual (中文 / English) world where RLHF has something to fix.

Everything is generated offline from `SeedWorldConfig` (same config -> identical world, in about a second):

  pretraining   number facts ("27 = 3 × 9。", "13 is prime.") mixed with forum posts that repeat confident
                claims, wrong at a set rate ("27 是一個質數，因為它是奇數。"), so a next-word model imitates both;
                plus a small fraction of template-format chats (`pretrain_chats`, forum-quality answers).
  SFT           an expert's answers ("27 不是質數，因為它可以被 3 整除。" / "No — 27 is divisible by 3."), a
                configurable fraction of them wrong (clean demos saturate SFT and leave the reward model nothing
                to learn, see docs/references.md), and multi-turn dialogues (what is a prime → is 27 prime → is π …).
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
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gptjax.seed_world.labeler import GoldOracle, Question, is_prime, numbers_in
from gptjax.seed_world.templates import (DEFINITION, FOLLOW_UPS, LANGUAGES, QUESTIONS, SHOWCASE_QUESTIONS,
                                         SPECIAL_QUESTIONS, SYSTEM_PROMPTS, WHY, WRONG_KINDS, ZH_QUESTIONS, Writer,
                                         join_sentences, other_language, weighted_numbers)



@dataclass(frozen=True)
class SeedWorldConfig:
    """Knobs of the seed world.

    The defaults give 312 held-out questions (26 primes + 26 composites, 2 languages x 3 phrasings) and 60k
    pretraining documents, about 6.3M byte-level tokens (the first prototype's budget, docs/references.md). With
    the byte tokenizer single-turn SFT conversations render to <= ~150 tokens, dialogues to <= max_dialogue_tokens
    (512).
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
    pretrained model answer in format, too strong a baseline (the first prototype, docs/references.md)."""

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
    """Fraction of single-turn demonstrations that are wrong (the first prototype found 20% useful,
    docs/references.md)."""
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
    writer = Writer(rng)
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
            texts.append(join_sentences(lang, [writer.write("fact", n, lang) for n in run]))
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
    writer = Writer(rng, heldout)
    demos = []
    for n in weighted_numbers(rng, numbers, cfg.prime_oversample, count):
        lang = rng.choice(LANGUAGES)
        if rng.random() < cfg.wrong_demo_fraction:
            kind = rng.choices((*WRONG_KINDS, "other_language"), weights=cfg.wrong_demo_mix)[0]
            answer = writer.write("expert", n, other_language(lang)) if kind == "other_language" else writer.write(
                kind, n, lang)
        else:
            answer = writer.write("expert", n, lang)
        demos.append(_maybe_system(cfg, rng, lang) + [{"role": "user", "content": writer.question(n, lang)},
                                                      {"role": "assistant", "content": answer}])
    return demos


def _dialogues(cfg: SeedWorldConfig, numbers: Sequence[int], heldout: frozenset[int], rng: random.Random):
    writer = Writer(rng, heldout)
    dialogues = []
    for _ in range(cfg.num_dialogues):
        lang = rng.choice(LANGUAGES)
        turns = _maybe_system(cfg, rng, lang)
        budget = rng.randint(2, cfg.dialogue_questions)
        if rng.random() < 0.7:
            turns += [{"role": "user", "content": DEFINITION[lang][0]},
                      {"role": "assistant", "content": DEFINITION[lang][1]}]
            budget -= 1
        asked_number = False
        while budget > 0:
            exchange = []
            if asked_number and rng.random() < 0.25:
                question, answer = rng.choice(SPECIAL_QUESTIONS[lang])
            else:
                n = weighted_numbers(rng, numbers, cfg.prime_oversample, 1)[0]
                template = rng.choice(FOLLOW_UPS[lang]) if asked_number else rng.choice(QUESTIONS[lang])
                question, answer = template.format(n=n), writer.write("expert", n, lang)
                if rng.random() < 0.3:  # the user asks why; the expert spells out the reason
                    exchange += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
                    question, answer = WHY[lang], writer.write("why", n, lang)
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
    writer = Writer(rng)
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
    writer = Writer(rng, frozenset(world.heldout_numbers))
    records = []
    for q in world.rm_prompts:
        answers = []
        for _ in range(k):
            kind = rng.choice(("expert", *WRONG_KINDS, "other_language"))
            answers.append(writer.write("expert", q.number, other_language(q.language)) if kind == "other_language"
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
