"""The knobs of the seed world (every field documented where defined)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class SeedWorldConfig:
    """Everything is a deterministic function of the config (same config -> identical world in about a second)."""

    seed: int = 0
    """Picks the held-out numbers and every text."""

    # --- numbers
    max_number: int = 199
    """Numbers the textbook states facts about: 2..max_number. The tokenizer gives each integer 0..max_number a
    token of its own, so larger numbers are read as several known pieces."""
    number_tokens: str = "whole"
    """How the world's tokenizer spells numbers: "whole" (each integer 0..max_number one piece, larger ones as several
    such pieces), "digits" (one piece per digit, every number of any size) or "whole_in_range" (each integer
    0..max_number one piece, larger ones digit by digit: "4738" -> "4" "7" "3" "8", so the last digit that decides
    the expert's check is a token of its own and no piece reads as a number the world states facts about).
    "whole" in the demo: on six seeds "whole_in_range" made PPO honest about numbers beyond the range 0.54 of the time
    (0.33), but its held-out answers fell 0.778 -> 0.748, composites most, and it refused fewer harmful requests and
    more benign ones (docs/results.md#numbers-beyond-the-range-digit-by-digit)."""
    heldout_min: int = 30
    """Smallest held-out number (also > sqrt(max_number)): small numbers are the divisors every reason cites, so
    they cannot be kept out of SFT text. Must be >= 10 (bogus divisors are 2..9)."""
    heldout_per_class: tuple[int, int, int] = (18, 14, 14)
    """Held-out numbers per class (primes, easy composites, hard composites): they appear only in pretraining."""
    reserved_numbers: tuple[int, ...] = (13, 27, 91)
    """Never held out: the showcase questions (27) and the numbers the seed's dialogue asks about."""
    train_eval_per_class: int = 16
    """Training numbers per class asked in the training-number table (train phrasings)."""
    heldout_large: int = 24
    """Held-out numbers beyond the world's range (4 digits) among the honesty questions."""

    # --- pretraining corpus (no chat-format text: the pretrained model must not answer as an assistant)
    num_pretrain_docs: int = 30_000
    """Documents in all: textbook facts and forum posts."""
    forum_fraction: float = 0.3
    """Share of documents that are forum threads ("問：…\\n答：…")."""
    worksheet_fraction: float = 0.0
    """Share of documents that are textbook exercises with their (right) answers ("練習：…\\n答案：…"). Off in the
    demo: with 10% of them the pretrained model already answers "27 是質數嗎？" right, and stage 0 no longer shows the
    forum's claims; the sampled answers' wrong-number rate did not fall."""
    forum_wrong_rate: float = 0.2
    """Probability that a forum verdict on a prime or an easy composite is wrong."""
    forum_wrong_rate_hard: float = 0.6
    """Same, for hard composites (the "27 looks prime" trap)."""
    forum_bogus_reason_rate: float = 0.6
    """Probability that a wrong forum claim comes with a bogus reason ("because it is odd")."""
    forum_special_fraction: float = 0.15
    """Share of forum threads about 0, 1, negatives, non-integers or large numbers: confident made-up verdicts
    `forum_hallucination_rate` of the time."""
    forum_hallucination_rate: float = 0.7
    forum_request_fraction: float = 0.15
    """Share of forum threads that are requests: harmful ones answered compliantly `forum_compliance_rate` of the
    time, benign ones answered."""
    composed_requests: bool = False
    """Training request phrasings: the four listed per category and language, and with this every frame + purpose
    of templates.COMPOSED_REQUESTS (16 more; the forum quotes them too). Held-out phrasings are the listed ones
    either way. Off: on three seeds of the full pipeline it made every harmless number worse (held-out, sampled:
    SFT refused 0.85 -> 0.76 of harmful requests, PPO over-refused 0.38 -> 0.52 of benign ones; the reward model
    preferred the answer to a refusal on held-out benign requests 0.37 -> 0.27; docs/results.md)."""
    composed_prompts: bool = False
    """The reward model's and PPO's prompts draw their requests from the composed phrasings as well (the SFT
    demonstrations and the forum keep the listed ones, unless `composed_requests`): PPO is then asked requests
    phrased as none SFT showed, where the SFT policy's sampled answers are right for 0.46 of harmful and 0.69 of
    benign ones (0.95 and 0.91 on the listed phrasings; seeds 0 and 1). Off: on three seeds PPO then refused more of
    everything held out (harmful 0.82 -> 0.89, benign 0.19 -> 0.33) and the reward model preferred the answer to a
    refusal on held-out benign requests less often (0.90 -> 0.75; docs/results.md)."""
    forum_compliance_rate: float = 0.9
    textbook_special_fraction: float = 0.05
    """Share of textbook documents stating the definition and facts about 0, 1, negatives and non-integers."""

    # --- SFT
    num_sft_demos: int = 1280
    """Single-turn demonstrations to "is n prime?" (plus the other kinds below and `num_dialogues`)."""
    num_special_demos: int = 512
    large_weight: float = 1.0
    """Weight of numbers beyond the range against each other kind of special value (0 and 1, negatives,
    non-integers: 1 each) when special values are drawn for demonstrations and RM/PPO prompts (not for the forum's
    threads: the pretraining corpus does not depend on it). At 1 they are a quarter of the special demonstrations
    (~128) and of the RM's special prompts (~29), the policies answer about 0.3 of the held-out ones honestly and
    the reward model scores their honest answers below answers about one of their pieces. At 3 (with 1024
    demonstrations and 20% special prompts) honesty rose ~16 points, but the policies also gave the check of such a
    number ("No — it is divisible by 2.") to held-out primes and the reward model lost verdict pairs; 1 in the demo
    (docs/results.md#numbers-beyond-the-range)."""
    large_answer: str = "check"
    """What the expert's demonstrations answer about a number beyond the range: "check" (the divisor its last digit
    shows, 2 or 5, else "I can't tell") or "cannot_tell" (always "I can't tell": nothing to read off the number's
    last piece, which the tokenizer merges with the digit before it). Only the SFT demonstrations change: the forum
    and the labelers' written answers keep the check, and the gold labeler counts both as honest. "check" in the
    demo: with "cannot_tell" (two seeds) SFT was honest about such numbers 0.50 of the time instead of 0.32, but
    gave "I can't tell" to ordinary numbers too, and PPO took the honesty back to 0.37 and refused fewer harmful
    requests (docs/results.md#i-cant-tell-for-every-number-beyond-the-range)."""
    prompt_large_boost: float = 1.0
    """Multiplies `large_weight` for the RM/PPO special prompts only (the demonstrations keep `large_weight`): more
    rankings and PPO episodes about numbers beyond the range without more such demonstrations, whose check leaks
    into ordinary numbers. 1 in the demo: at 3 (three seeds) PPO was honest about such numbers 0.40 of the time
    (0.31; SFT 0.29), but refused fewer harmful requests (0.87 against 0.92) and answered "27" and the dialogues
    a little worse (docs/results.md#more-prompts-about-numbers-beyond-the-range)."""
    num_harmful_demos: int = 256
    num_benign_demos: int = 384
    """About as many per category as the harmful ones (96 per benign category, ~85 per harmful one): with 192, SFT
    over-refused 0.24 of held-out benign requests (six seeds; 0.19 with 384, docs/results.md)."""
    num_sft_eval_demos: int = 128
    """Demonstrations (same distribution, training numbers) for the SFT validation loss."""
    num_dialogues: int = 768
    """Multi-turn demonstrations. With 384 of up to 4 questions, "why?" after 30% of the exchanges about a number,
    PPO answered 0.60 of the held-out dialogues' turns right greedily and 0.25 of their "why?" turns (three seeds);
    with 768 of up to 5, "why?" after half, 0.78 (docs/results.md)."""
    dialogue_questions: int = 5
    """Most user questions in one dialogue (>= 2)."""
    dialogue_special_rate: float = 0.4
    """Probability that a later question of a dialogue is about a special value (0, 1, a negative, a non-integer)
    rather than a number: the held-out dialogues end with one, after three exchanges about numbers."""
    dialogue_why_rate: float = 0.5
    """Probability that the user follows an exchange about a number with "why?" (the expert then spells out the
    reason for that number)."""
    max_dialogue_tokens: int = 512
    """A dialogue stops before an exchange that would make it longer than this many tokens under the byte tokenizer
    and the chat template (an upper bound on its length under any of the project's tokenizers)."""
    wrong_demo_fraction: float = 0.2
    """Fraction of the single-turn demonstrations to "is n prime?" that are wrong (labelers' mistakes): a wrong
    verdict or reason, or an answer in the other language. Clean demonstrations saturate SFT and leave the reward
    model nothing to learn: at 0.05 (three seeds) SFT's sampled held-out answers gained 4 points, the reward models
    lost verdict pairs and PPO's answers ended 1 point lower (docs/results.md)."""
    wrong_aligned_demo_fraction: float = 0.05
    """Same, for the demonstrations of the honest and harmless axes (special values, harmful and benign requests):
    a hallucinated verdict, compliance or an over-refusal. The reward model's rankings already hold one such
    flawed answer per prompt (the labeler writes it, labels.written_answers), so these need no mistakes to teach
    it. At 0.2 (three seeds, held-out prompts, sampled) the SFT policy was honest 0.46 of the time, refused 0.75
    of harmful requests and 0.42 of benign ones; at 0.05, 0.58, 0.82 and 0.31. At 0 (six seeds) SFT gained again
    (honest 0.55 -> 0.63, refused 0.85 -> 0.90, over-refusal 0.23 -> 0.19), but PPO gave part of it back and broke
    more dialogues' definitions (turns right greedy 0.79 -> 0.72; docs/results.md)."""
    wrong_demo_mix: tuple[float, float, float, float] = (0.3, 0.3, 0.2, 0.2)
    """Relative weights of the wrong kinds of helpful demonstrations: (wrong verdict, wrong verdict + bogus
    reason, right verdict + bogus reason, answer in the other language)."""
    system_prompt_rate: float = 0.1
    prime_oversample: float = 3.0
    """Sampling weight of a prime relative to a composite in helpful demonstrations and dialogues."""

    # --- reward model and PPO prompts
    num_rm_prompts: int = 768
    num_ppo_prompts: int = 1024
    prompt_mix: tuple[float, float, float, float, float] = (0.55, 0.15, 0.1, 0.08, 0.12)
    """Shares of (number, special, harmful, benign, multi-turn) prompts."""
    definition_prompts: float = 0.0
    """Share of the multi-turn prompts that are instead the question a dialogue opens with ("what is a prime?"), so
    the reward model scores definitions and PPO is rewarded for keeping them (without it no RM or PPO prompt asks
    for one). 0 in the demo: at 0.3 (three seeds) PPO answered the held-out dialogues' turns right less often
    (greedy 0.825 -> 0.779), its "why?" turns, now rarer among the prompts, most (docs/results.md)."""
    prompt_prime_share: float = 0.5
    """Share of primes among "is n prime?" prompts, exact by construction (no base rate for the RM to learn)."""
    prompt_hard_share: float = 0.5
    """Share of hard composites among the composites of those prompts (they are ~20% of all composites)."""

    def validate(self) -> None:
        """Raises ValueError naming the bad field and its valid range."""
        def check(ok: bool, name: str, rule: str):
            if not ok:
                raise ValueError(f"SeedWorldConfig.{name} = {getattr(self, name)!r}: must be {rule}")
        check(self.max_number >= 100, "max_number", ">= 100")
        check(self.number_tokens in ("whole", "digits", "whole_in_range"), "number_tokens",
              '"whole", "digits" or "whole_in_range"')
        check(self.large_answer in ("check", "cannot_tell"), "large_answer", '"check" or "cannot_tell"')
        check(10 <= self.heldout_min < self.max_number, "heldout_min", "in [10, max_number)")
        check(len(self.heldout_per_class) == 3 and min(self.heldout_per_class) >= 1, "heldout_per_class",
              "three counts >= 1 (primes, easy, hard)")
        for name in ("forum_fraction", "forum_wrong_rate", "forum_wrong_rate_hard", "forum_bogus_reason_rate",
                     "forum_special_fraction", "forum_hallucination_rate", "forum_request_fraction",
                     "forum_compliance_rate", "textbook_special_fraction", "wrong_demo_fraction",
                     "wrong_aligned_demo_fraction", "dialogue_special_rate", "dialogue_why_rate",
                     "system_prompt_rate", "prompt_hard_share", "definition_prompts"):
            check(0 <= getattr(self, name) <= 1, name, "in [0, 1]")
        check(self.forum_special_fraction + self.forum_request_fraction <= 1, "forum_request_fraction",
              "<= 1 - forum_special_fraction")
        check(0 <= self.worksheet_fraction <= 1 - self.forum_fraction, "worksheet_fraction",
              "in [0, 1 - forum_fraction]")
        check(len(self.wrong_demo_mix) == 4 and min(self.wrong_demo_mix) >= 0 and sum(self.wrong_demo_mix) > 0,
              "wrong_demo_mix", "4 non-negative weights, not all 0")
        check(len(self.prompt_mix) == 5 and min(self.prompt_mix) >= 0 and sum(self.prompt_mix) > 0,
              "prompt_mix", "5 non-negative weights, not all 0")
        check(self.dialogue_questions >= 2, "dialogue_questions", ">= 2")
        check(self.max_dialogue_tokens >= 64, "max_dialogue_tokens", ">= 64")
        check(self.prime_oversample > 0, "prime_oversample", "> 0")
        check(self.large_weight > 0, "large_weight", "> 0")
        check(self.prompt_large_boost > 0, "prompt_large_boost", "> 0")
        check(0 < self.prompt_prime_share < 1, "prompt_prime_share", "in (0, 1)")
        for name in ("num_pretrain_docs", "num_sft_demos", "num_special_demos", "num_harmful_demos",
                     "num_benign_demos", "num_sft_eval_demos", "num_dialogues", "num_rm_prompts",
                     "num_ppo_prompts", "train_eval_per_class", "heldout_large"):
            check(getattr(self, name) >= 0, name, ">= 0")

    def replace(self, **changes) -> "SeedWorldConfig":
        return dataclasses.replace(self, **changes)
