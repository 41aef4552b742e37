"""Request phrasings of the seed world: the listed ones and the composed ones (templates.COMPOSED_REQUESTS), and
which texts each setting puts them in (SFT demonstrations, RM/PPO prompts, the forum)."""

import pytest

from gptjax.seed_world import templates as T
from gptjax.seed_world import world as sw
from gptjax.seed_world.config import SeedWorldConfig


def _phrasings() -> tuple[set[str], set[str]]:
    composed, listed = set(), set()
    for kind, table in T.REQUESTS.items():
        for cat in table:
            for lang in T.LANGUAGES:
                train = T.request_phrasings(kind, cat, "train", lang, True)
                composed |= set(train) - set(table[cat]["train"][lang])
                listed |= set(table[cat]["train"][lang])
    return composed, listed


def test_composed_requests_share_frames_across_kinds_and_miss_the_heldout_phrasings():
    """Written-text requests, harmful and benign, are composed from the same frames (the frame says nothing about
    harm); no composed phrasing is a held-out one, and held-out phrasings are the listed ones only."""
    for harmful, benign in (("scam", "message"), ("insult", "encourage"), ("password", "password")):
        for lang in T.LANGUAGES:
            assert T.COMPOSED_REQUESTS["harmful"][harmful][lang][0] == T.COMPOSED_REQUESTS["benign"][benign][lang][0]
    for kind, table in T.REQUESTS.items():
        for cat in table:
            for lang in T.LANGUAGES:
                train = T.request_phrasings(kind, cat, "train", lang, True)
                assert len(train) == len(set(train)) == len(table[cat]["train"][lang]) + 16
                assert not set(train) & set(table[cat]["heldout"][lang])
                assert T.request_phrasings(kind, cat, "heldout", lang, True) == table[cat]["heldout"][lang]


@pytest.mark.parametrize("composed_requests,composed_prompts", [(False, False), (True, False), (False, True)])
def test_each_setting_puts_the_composed_phrasings_where_it_says(composed_requests, composed_prompts):
    """composed_requests: the SFT demonstrations, the RM/PPO prompts and the forum use the composed phrasings;
    composed_prompts: the RM/PPO prompts only; neither: no text holds one. The listed phrasings stay everywhere."""
    composed, listed = _phrasings()
    built = sw.build_world(SeedWorldConfig(num_pretrain_docs=2000, composed_requests=composed_requests,
                                           composed_prompts=composed_prompts))
    demonstrated = {conv[-2]["content"] for conv in built.sft_conversations if len(conv) <= 3}
    prompted = {q.text for q in built.rm_prompts + built.ppo_prompts if q.kind in ("harmful", "benign")}
    quoted = {t.split("\n", 1)[0].split("：", 1)[-1].split(": ", 1)[-1] for t in built.pretrain_texts}
    assert demonstrated & listed and prompted & listed and quoted & listed
    assert (len(prompted & composed) > 0.5 * len(composed)) == (composed_requests or composed_prompts)
    assert (len(demonstrated & composed) > 0.5 * len(composed)) == composed_requests
    assert bool(quoted & composed) == composed_requests
    if not composed_requests:
        assert not (demonstrated | quoted) & composed
    if not (composed_requests or composed_prompts):
        assert not prompted & composed
