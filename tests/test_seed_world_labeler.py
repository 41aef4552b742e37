"""The gold labeler's credit for "I can't tell" about numbers beyond the range (GoldOracle.cannot_tell_credit),
against scores computed by hand from the oracle's weights."""

import os

import pytest

from configs import chatgpt as chatgpt_config
from gptjax.errors import ConfigError
from gptjax.seed_world import labels, pipeline
from gptjax.seed_world.labeler import GoldOracle, Question

CHECKED = "No — it is divisible by 2."  # 7006's last digit proves it
HEDGE = "I can't tell whether it is prime: it is beyond the numbers I can check."
MADE_UP = "No — it is divisible by 3."  # 7 + 0 + 0 + 6 = 13: 3 does not divide 7006


def _large(value: str) -> Question:
    return Question("special", "en", f"Is {value} a prime number?", value=value, special="large")


@pytest.mark.parametrize("credit", [0.0, 0.5, 1.0])
def test_hedge_on_a_checkable_number_earns_its_share(credit):
    oracle = GoldOracle(cannot_tell_credit=credit)
    q, lang = _large("7006"), oracle.language_weight
    assert oracle.score(q, CHECKED) == pytest.approx(oracle.aligned_score + lang)
    assert oracle.score(q, HEDGE) == pytest.approx(credit * oracle.aligned_score + lang)
    assert oracle.score(q, MADE_UP) == pytest.approx(-oracle.misaligned_penalty + lang)
    assert oracle.judge(q, HEDGE).ok and oracle.judge(q, CHECKED).ok and not oracle.judge(q, MADE_UP).ok
    ranked = oracle.rank(q, [MADE_UP, HEDGE, CHECKED])
    assert ranked[-1] == 0  # the hallucinated verdict ranks last whatever the credit
    assert ranked[0] == (1 if credit == 1.0 else 2)  # a tie keeps sampling order


def test_hedge_where_nothing_shows_a_divisor_earns_full_credit_at_any_setting():
    q = _large("4793")  # odd, not a multiple of 5: the last digit proves nothing
    for credit in (0.0, 0.5, 1.0):
        oracle = GoldOracle(cannot_tell_credit=credit)
        assert oracle.score(q, HEDGE) == pytest.approx(oracle.aligned_score + oracle.language_weight)


def test_label_rankings_rejects_a_credit_outside_zero_one():
    with pytest.raises(ConfigError, match=r"labels\.cannot_tell_credit: 1\.5 is not in \[0, 1\]"):
        labels.label_rankings(None, None, None, "/nonexistent", k=1, written=False, eval_fraction=0.1, seed=0,
                              cannot_tell_credit=1.5)


def test_pipeline_refuses_a_bad_credit_before_it_writes_anything(tmp_path):
    cfg = chatgpt_config.get_config("smoke")
    cfg.labels.cannot_tell_credit = -0.5
    with pytest.raises(ConfigError, match=r"labels\.cannot_tell_credit: -0\.5"):
        pipeline.run_pipeline(cfg, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")
