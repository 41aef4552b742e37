"""The reward model's and PPO's prompts: the definition questions among them (`definition_prompts`) and what the
labeler writes for them."""

import dataclasses
import random

from gptjax.seed_world import labels
from gptjax.seed_world import templates as T
from gptjax.seed_world import world as sw
from gptjax.seed_world.config import SeedWorldConfig

SMALL = SeedWorldConfig(num_pretrain_docs=500, num_sft_demos=64, num_dialogues=16)


def test_definition_prompts_take_their_share_of_the_multi_turn_prompts_in_training_phrasings():
    base = sw.build_world(SMALL)
    world = sw.build_world(dataclasses.replace(SMALL, definition_prompts=0.5))
    for prompts, count in ((world.rm_prompts, SMALL.num_rm_prompts), (world.ppo_prompts, SMALL.num_ppo_prompts)):
        multi_turn = round(SMALL.prompt_mix[4] / sum(SMALL.prompt_mix) * count)
        definitions = [q for q in prompts if q.kind == "definition"]
        assert len(prompts) == count and len(definitions) == round(0.5 * multi_turn)
        assert all(q.context == () for q in definitions)
        assert {q.language for q in definitions} == set(T.LANGUAGES)
        for q in definitions:  # never the held-out phrasing the evaluation's dialogues open with
            assert q.text in T.DEFINITION_QUESTIONS["train"][q.language]
            assert q.text not in T.DEFINITION_QUESTIONS["heldout"][q.language]
    assert not any(q.kind == "definition" for q in base.rm_prompts + base.ppo_prompts)
    assert world.sft_conversations == base.sft_conversations  # prompts draw from their own random stream


def test_labeler_writes_the_definition_and_an_answer_about_a_number_and_ranks_the_definition_first():
    world = sw.build_world(dataclasses.replace(SMALL, definition_prompts=1.0))
    rng = random.Random(0)
    for q in [q for q in world.rm_prompts if q.kind == "definition"][:10]:
        definition, about_a_number = labels.written_answers(q, rng, world)
        assert definition in T.DEFINITION_ANSWERS[q.language]
        judged = world.oracle.judge(q, definition), world.oracle.judge(q, about_a_number)
        assert judged[0].ok and not judged[1].ok
        assert world.oracle.rank(q, [about_a_number, definition]) == [1, 0]


def test_prompt_large_boost_weighs_numbers_beyond_the_range_in_the_prompts_only():
    """Kinds are drawn with weights (1 each, `large_weight`·`prompt_large_boost` for numbers beyond the range), so
    with 3 about half the single-turn special prompts are such numbers (a quarter without); the demonstrations stay."""
    base = sw.build_world(SMALL)
    world = sw.build_world(dataclasses.replace(SMALL, prompt_large_boost=3.0))

    def large_share(w):
        specials = [q for q in w.rm_prompts + w.ppo_prompts if q.kind == "special" and not q.context]
        return sum(q.special == "large" for q in specials) / len(specials)

    assert 0.15 < large_share(base) < 0.35 and 0.4 < large_share(world) < 0.6
    assert world.sft_conversations == base.sft_conversations
