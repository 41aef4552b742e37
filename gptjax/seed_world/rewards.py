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
    """The gold labeler's score of ``answer`` to the question of ``prompt_record`` ({"prompt", "meta": {"number",
    "language"}})."""
    meta = prompt_record.get("meta")
    if not isinstance(meta, dict) or "number" not in meta or "language" not in meta:
        raise ValueError(f"gold_reward needs a seed-world prompt record {{'prompt', 'meta': {{'number', 'language'}}}}"
                         f", got keys {sorted(prompt_record)}")
    prompt = prompt_record.get("prompt")
    text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
    return ORACLE.score(labeler.Question(int(meta["number"]), str(meta["language"]), text), answer)
