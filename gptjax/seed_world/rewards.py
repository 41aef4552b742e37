"""The seed world's verifiable reward: its gold labeler as a reward function for RL
(``reward.source = "function"``, ``reward.function = "gptjax.seed_world.rewards:gold_reward"``).

A reward function is ``(prompt_record, answer) -> float`` (gptjax/stages/online/rewards.py); the seed world's prompt
records carry the question in their "meta" (``labeler.Question.to_record``), so the labeler scores an answer from
the record alone. Only this adapter knows the record's layout: point it elsewhere when the world changes.
"""

from __future__ import annotations

from gptjax.seed_world import labeler

ORACLE = labeler.GoldOracle()  # the labeler's default weights (the seed world's defaults)


def gold_reward(prompt_record: dict, answer: str) -> float:
    """The gold labeler's score of ``answer`` to the question of ``prompt_record`` ({"prompt", "meta"}: every kind
    of prompt the world writes, numbers, special values and requests, read by ``labeler.Question.from_record``)."""
    return ORACLE.score(labeler.Question.from_record(prompt_record, "gold_reward"), answer)
