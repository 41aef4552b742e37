"""The seed world (gptjax/seed_world/: world, labeler, templates), checked against properties and hand-computed
values: same config -> identical world, built in well under 10 s; held-out numbers never appear in SFT/RM/PPO text
(searched with digit boundaries, independently of the module's own check) but do appear in pretraining; the
held-out set is balanced and >= 300 questions; the labeler's verdicts / reasons / language on hand-judged answers;
evaluate_answers against metrics computed by hand; generated wrong-claim and wrong-demo rates against the config;
files readable by the post-training readers."""

import dataclasses
import json
import re
import time

import numpy as np
import pytest

from gptjax.data import post_training as pt
from gptjax.seed_world import labeler
from gptjax.seed_world import world as sw
from gptjax.tokenizers import make_tokenizer

TOK = make_tokenizer("bytes")
SMALL = sw.SeedWorldConfig(num_pretrain_docs=4000)


@pytest.fixture(scope="module")
def world():
    return sw.build_world(sw.SeedWorldConfig())


def _primes_upto(n):  # sieve: an implementation independent of seed_world.is_prime
    sieve = np.ones(n + 1, bool)
    sieve[:2] = False
    for p in range(2, int(n ** 0.5) + 1):
        sieve[p * p::p] &= ~sieve[p]
    return set(np.flatnonzero(sieve).tolist())


PRIMES = _primes_upto(2000)


def _mentions(text: str, n: int) -> bool:
    return re.search(rf"(?<![0-9]){n}(?![0-9])", text) is not None


def test_same_seed_same_world_fast():
    start = time.perf_counter()
    a = sw.build_world(sw.SeedWorldConfig())
    assert time.perf_counter() - start < 10
    b = sw.build_world(sw.SeedWorldConfig())
    assert dataclasses.asdict(a) == dataclasses.asdict(b)
    c = sw.build_world(dataclasses.replace(SMALL, seed=1))
    assert c.heldout_numbers != a.heldout_numbers and c.sft_conversations != a.sft_conversations


def test_parts_have_independent_streams():
    a = sw.build_world(SMALL)
    b = sw.build_world(dataclasses.replace(SMALL, num_pretrain_docs=1000, num_ppo_prompts=10))
    assert a.heldout_numbers == b.heldout_numbers and a.sft_conversations == b.sft_conversations
    assert a.rm_prompts == b.rm_prompts and a.heldout_questions == b.heldout_questions


def test_heldout_numbers_never_in_post_training_text(world, tmp_path):
    texts = [t["content"] for c in world.sft_conversations + world.sft_eval_conversations + world.dialogues
             for t in c] + [q.text for q in world.rm_prompts + world.ppo_prompts]
    files = sw.write_jsonl(world, tmp_path)
    raw = {name: files[name].read_text(encoding="utf-8")
           for name in ("sft_train", "sft_eval", "rm_prompts", "ppo_prompts", "rankings_template")}
    pretrain = " ".join(world.pretrain_texts)
    for n in world.heldout_numbers:
        assert not any(_mentions(t, n) for t in texts), n
        assert not any(_mentions(r, n) for r in raw.values()), n
        assert _mentions(pretrain, n)  # the facts are learnable from pretraining only
    assert set(world.heldout_numbers).isdisjoint(world.train_numbers)
    assert {q.number for q in world.rm_prompts + world.ppo_prompts} <= set(world.train_numbers)


@pytest.mark.parametrize("cfg", [sw.SeedWorldConfig(), dataclasses.replace(SMALL, max_number=999,
                                                                            heldout_fraction=0.25, seed=5)])
def test_heldout_set_is_balanced_and_large(cfg):
    w = sw.build_world(cfg)
    qs = w.heldout_questions
    assert len(qs) >= 300
    primes = [q for q in qs if q.number in PRIMES]
    assert len(primes) * 2 == len(qs)
    assert sum(q.language == "zh" for q in qs) * 2 == len(qs)
    assert {q.number for q in qs} == set(w.heldout_numbers)
    assert min(w.heldout_numbers) >= max(cfg.heldout_min, int(cfg.max_number ** 0.5) + 1)
    assert not set(cfg.reserved_numbers) & set(w.heldout_numbers)
    for q in qs:  # each question asks about its own number in its own language
        assert _mentions(q.text, q.number) and (re.search(r"[\u4e00-\u9fff]", q.text) is not None) == (
            q.language == "zh")


def test_prompts_hold_the_configured_share_of_primes(world):
    train = set(world.train_numbers)
    for prompts in (world.rm_prompts, world.ppo_prompts):
        assert sum(q.number in PRIMES for q in prompts) == round(0.5 * len(prompts))  # exact, not on average
        assert {q.number for q in prompts} <= train
    skewed = sw.build_world(dataclasses.replace(world.config, prompt_prime_share=0.25))
    assert sum(q.number in PRIMES for q in skewed.ppo_prompts) == round(0.25 * len(skewed.ppo_prompts))
    assert skewed.heldout_questions == world.heldout_questions  # prompts have their own stream


# ---- the labeler ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("number, language, answer, correct, reason, language_match", [
    (27, "zh", "27 不是質數，因為它可以被 3 整除。", True, "valid", True),
    (27, "en", "No — 27 is divisible by 3.", True, "valid", True),
    (27, "en", "No, 27 is not prime: 27 = 3 × 9.", True, "valid", True),
    (27, "en", "27 is prime.", False, "none", True),
    (27, "zh", "27 是一個質數。", False, "none", True),
    (27, "zh", "27 不是質數，因為它可以被 5 整除。", True, "invalid", True),
    (27, "en", "No, 27 is not prime: 27 = 3 × 3.", True, "invalid", True),
    (27, "zh", "No — 27 is divisible by 3.", True, "valid", False),
    (27, "zh", "27 是質數，因為它只能被 1 和它自己整除。", False, "invalid", True),
    (27, "zh", "27 是質數，因為它可以被 3 整除。", False, "invalid", True),  # true divisor, wrong conclusion
    (27, "zh", "27 可以被 3 整除。", True, "valid", True),  # implied verdict
    (27, "zh", "21 不是質數，因為它可以被 3 整除。", False, "invalid", True),  # about another number
    (27, "zh", "27 是不是質數？27 不是質數。", True, "none", True),  # echoed question claims nothing
    (13, "en", "Yes — 13 is prime: it has no divisor other than 1 and itself.", True, "valid", True),
    (13, "zh", "13 是質數，因為它只能被 1 和它自己整除。", True, "valid", True),
    (13, "en", "The only divisors of 13 are 1 and 13.", True, "valid", True),
    (13, "en", "Yes, 13 is prime because it is not divisible by 2.", True, "none", True),
    (13, "zh", "13 不是質數，因為它可以被 3 整除。", False, "invalid", True),
    (27, "en", "27 is prime and 27 is not prime.", False, "none", True),
    (27, "en", "}{ %%% \x00 🙂", False, "none", False),
    (27, "zh", "", False, "none", False),
])
def test_labeler_judges_hand_labelled_answers(number, language, answer, correct, reason, language_match):
    j = labeler.judge(number, language, answer)
    assert (j.verdict_correct, j.reason, j.language_match) == (correct, reason, language_match)
    assert j.score == pytest.approx(1.0 * correct + 0.5 * (reason == "valid") - 0.25 * (reason == "invalid")
                                    + 0.25 * language_match)
    assert labeler.gold_score(number, language, answer) == j.score


def test_parse_answer_survives_garbage():
    rng = np.random.default_rng(0)
    for _ in range(200):
        text = "".join(rng.choice(list("0123456789 ×=是不質數被整除prime not divisible by 1 and itself？?。")) for _ in
                       range(int(rng.integers(0, 60))))
        labeler.parse_answer(text)
        labeler.judge(int(rng.integers(2, 500)), "zh", text)
    assert labeler.parse_answer(None).verdict is None


def test_rank_is_stable_and_ranking_record_is_valid():
    oracle = labeler.GoldOracle()
    q = labeler.Question(27, "zh", "27 是不是質數？")
    answers = ["27 是質數。", "27 不是質數，因為它可以被 3 整除。", "27 是一個質數。", "No — 27 is divisible by 3.",
               "27 不是質數，因為它可以被 3 整除。", ""]
    # scores 0.25, 1.75, 0.25, 1.5, 1.75, 0 -> ties keep their order
    assert oracle.rank(q, answers) == [1, 4, 3, 0, 2, 5]
    assert oracle.rank(q, answers, distinct_scores=True) == [1, 3, 0, 5]
    record = oracle.ranking_record(q, answers)
    assert record["responses"] == ["27 不是質數，因為它可以被 3 整除。", "No — 27 is divisible by 3.", "27 是質數。"]
    pt.parse_ranking("test", record)  # a valid rankings record
    assert oracle.ranking_record(q, ["27 是質數。", "27 是質數。", " "]) is None


def test_evaluate_answers_hand_computed():
    questions = [labeler.Question(13, "zh", "13 是質數嗎？"), labeler.Question(13, "en", "Is 13 prime?"),
                 labeler.Question(27, "zh", "27 是不是質數？"), labeler.Question(27, "en", "Is 27 prime?"),
                 labeler.Question(51, "en", "Is 51 prime?")]
    answers = ["13 是質數，因為它只能被 1 和它自己整除。",  # right, valid, zh: 1.75
               "No, 13 is not prime.",  # wrong, no reason: 0.25
               "No — 27 is divisible by 3.",  # right, valid, wrong language: 1.5
               "27 is not prime, it is divisible by 5.",  # right, false reason: 1.0
               "51 is prime."]  # wrong: 0.25
    m = labeler.evaluate_answers(questions, answers)
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["valid_reason_rate"] == pytest.approx(2 / 5)
    assert m["language_match"] == pytest.approx(4 / 5)
    assert m["mean_gold_score"] == pytest.approx((1.75 + 0.25 + 1.5 + 1.0 + 0.25) / 5)
    assert m["num_questions"] == 5


# ---- generated data against the config -----------------------------------------------------------------------

def test_expert_and_wrong_demo_rates(world):
    oracle = world.oracle
    single = [c for c in world.sft_conversations if sum(t["role"] == "user" for t in c) == 1]
    assert len(single) == world.config.num_sft_demos
    imperfect = []
    for conv in single:
        question, answer = conv[-2]["content"], conv[-1]["content"]
        number = int(re.search(r"[0-9]+", question).group())
        language = "zh" if re.search(r"[\u4e00-\u9fff]", question) else "en"
        imperfect.append(oracle.score(labeler.Question(number, language, question), answer) < 1.75)
    rate = world.config.wrong_demo_fraction
    assert abs(np.mean(imperfect) - rate) < 4 * np.sqrt(rate * (1 - rate) / len(single))
    # every dialogue answer about a number is the expert's (full marks)
    for dialogue in world.dialogues:
        assert sum(t["role"] == "user" for t in dialogue) >= 2
        for user, assistant in zip(dialogue[-2::-2], dialogue[-1::-2]):
            nums = re.findall(r"[0-9]+", user["content"])
            if nums and "π" not in user["content"] and int(nums[0]) > 1:
                lang = "zh" if re.search(r"[\u4e00-\u9fff]", user["content"]) else "en"
                assert labeler.judge(int(nums[0]), lang, assistant["content"]).score == 1.75, (user, assistant)


@pytest.mark.parametrize("wrong_rate", [0.0, 1.0])
def test_forum_claims_are_wrong_at_the_configured_rate(wrong_rate):
    cfg = dataclasses.replace(SMALL, num_pretrain_docs=600, forum_fraction=1.0, chat_fraction=0.0,
                              forum_wrong_rate=wrong_rate, forum_wrong_rate_odd_composite=wrong_rate)
    w = sw.build_world(cfg)
    for text in w.pretrain_texts:  # each forum post is about the first number it names
        number = int(re.search(r"[0-9]+", text).group())
        language = "zh" if re.search(r"[\u4e00-\u9fff]", text) else "en"
        assert labeler.judge(number, language, text).verdict_correct == (wrong_rate == 0.0), text


def test_pretraining_mix_and_wrong_claims_present(world):
    cfg = world.config
    assert len(world.pretrain_texts) + len(world.pretrain_chats) == cfg.num_pretrain_docs
    assert len(world.pretrain_chats) == round(cfg.chat_fraction * cfg.num_pretrain_docs)
    assert any(re.search(r"(?<![0-9])27 是(一個)?質數", t) for t in world.pretrain_texts)  # the seed's wrong claim
    zh = sum(re.search(r"[\u4e00-\u9fff]", t) is not None for t in world.pretrain_texts)
    assert 0.4 < zh / len(world.pretrain_texts) < 0.6  # both languages, about equally


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="SeedWorldConfig.heldout_fraction = 1.5: must be in"):
        sw.build_world(dataclasses.replace(SMALL, heldout_fraction=1.5))
    with pytest.raises(ValueError, match="SeedWorldConfig.heldout_min = 5"):
        sw.build_world(dataclasses.replace(SMALL, heldout_min=5))


def test_jsonl_files_load_with_post_training_readers(world, tmp_path):
    files = sw.write_jsonl(world, tmp_path)
    longest = max(len(t["content"].encode()) for c in world.sft_conversations for t in c)
    assert longest < 200
    sft = pt.sft_examples(files["sft_train"], TOK, 1024)
    assert sft["segment_ids"].max() > 1 and sft["weights"].sum() > 0
    assert len(pt.prompt_examples(files["ppo_prompts"], TOK, 64)) == len(world.ppo_prompts)
    rankings = pt.ranking_examples(files["rankings_template"], TOK, 256)
    assert rankings["num_ranked"].min() >= 2
    heldout = [json.loads(line) for line in files["heldout"].read_text(encoding="utf-8").splitlines()]
    assert sw.read_questions(heldout) == world.heldout_questions
    assert json.loads(files["config"].read_text())["seed"] == world.config.seed


@pytest.mark.parametrize("limit", [512, 200])
def test_dialogues_fit_the_token_budget(limit):
    """Every dialogue renders (byte tokenizer + chat template) within max_dialogue_tokens, for several seeds;
    seed 2 of the demo world drew a 527-token dialogue before the limit existed."""
    from gptjax.data import chat

    tok = make_tokenizer("bytes")
    for seed in range(4):
        cfg = sw.SeedWorldConfig(seed=seed, max_number=199, heldout_fraction=0.55, heldout_phrasings=4,
                                 num_pretrain_docs=10, max_dialogue_tokens=limit)
        dialogues = [c for c in sw.build_world(cfg).sft_conversations if sum(t["role"] == "user" for t in c) > 1]
        lengths = [len(chat.render(c, tok)[0]) for c in dialogues]
        assert dialogues and max(lengths) <= limit, (seed, max(lengths))
