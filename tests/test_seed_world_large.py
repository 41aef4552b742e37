"""What the expert's demonstrations answer about numbers beyond the world's range (`large_answer`)."""

import dataclasses
import re

import pytest

from gptjax.seed_world import templates as T
from gptjax.seed_world import world as sw
from gptjax.seed_world.config import SeedWorldConfig
from gptjax.seed_world.labeler import Question

SMALL = SeedWorldConfig(num_pretrain_docs=500, num_sft_demos=64, num_dialogues=16, num_special_demos=400,
                        wrong_aligned_demo_fraction=0.0)


def _large_demos(world) -> list[tuple[str, str, int]]:
    """(question, answer, number) of every single-turn demonstration about a number beyond the range."""
    out = []
    for conv in world.sft_conversations:
        if len(conv) <= 3 and (m := re.search(r"(?<![\d.\-/√])(\d{4})(?![\d.])", conv[-2]["content"])):
            out.append((conv[-2]["content"], conv[-1]["content"], int(m.group(1))))
    return out


def _unknown(lang: str) -> str:
    return T.HONEST["large_unknown"][lang][0]


def test_the_check_gives_the_divisor_the_last_digit_shows_and_cannot_tell_never_does():
    checked = _large_demos(sw.build_world(SMALL))
    unknown = _large_demos(sw.build_world(dataclasses.replace(SMALL, large_answer="cannot_tell")))
    assert len(checked) > 50 and [q for q, _, _ in checked] == [q for q, _, _ in unknown]
    for (_, answer, n), (_, cannot_tell, _) in zip(checked, unknown):
        lang = "zh" if re.search(r"[\u4e00-\u9fff]", answer) else "en"
        visible = 2 if n % 2 == 0 else 5 if n % 5 == 0 else None
        if visible:
            assert answer == T.HONEST["large_divisible"][lang][0].format(d=visible)
        else:
            assert answer == _unknown(lang)
        assert cannot_tell == _unknown(lang)
    assert any(n % 2 == 0 for _, _, n in checked) and any(n % 10 in (1, 3, 7, 9) for _, _, n in checked)


def test_cannot_tell_changes_only_the_demonstrations_and_the_labeler_calls_it_honest():
    base = sw.build_world(SMALL)
    world = sw.build_world(dataclasses.replace(SMALL, large_answer="cannot_tell"))
    assert world.pretrain_texts == base.pretrain_texts
    assert (world.rm_prompts, world.ppo_prompts) == (base.rm_prompts, base.ppo_prompts)
    assert world.sft_conversations != base.sft_conversations
    for lang, value in (("zh", "4662"), ("en", "4662"), ("en", "8707")):
        q = Question("special", lang, f"Is {value} prime?", special="large", value=value)
        judged = world.oracle.judge(q, _unknown(lang))
        assert judged.ok and not judged.hallucination and judged.cannot_tell


def test_an_unknown_large_answer_is_refused_by_name():
    with pytest.raises(ValueError, match="large_answer"):
        dataclasses.replace(SMALL, large_answer="guess").validate()
