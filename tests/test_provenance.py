"""A pipeline workdir refuses to reuse an artifact built from other inputs (gptjax/seed_world/provenance.py).

Reference: the dependency chain written out by hand (tokenizer -> pretrain -> sft -> labels -> reward -> ppo, and
which world file or setting each reads); every case checks which artifacts are refused and that nothing was written.
"""

import json
import os
import re

import pytest

from configs import chatgpt as chatgpt_config
from gptjax.errors import ConfigError
from gptjax.seed_world import provenance

FILES = ("pretrain", "sft_train", "sft_eval", "rm_prompts", "ppo_prompts", "heldout")


def _digests(**changed_files) -> dict:
    return {name: provenance.text_digest(changed_files.get(name, f'{{"text": "{name} record"}}\n')) for name in FILES}


def _hold(workdir, *artifacts):
    """Makes the workdir hold ``artifacts`` as the pipeline leaves them (a file or a run directory)."""
    for name in artifacts:
        for rel in provenance.ARTIFACTS[name][0]:
            path = os.path.join(workdir, rel)
            if rel.endswith((".model", ".jsonl")):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                open(path, "w").close()
            else:
                os.makedirs(path, exist_ok=True)


@pytest.fixture
def cfg():
    return chatgpt_config.get_config("smoke")


def _refused(workdir, cfg, digests) -> set[str]:
    """The artifacts a re-run with (cfg, digests) is refused for; asserts the record was left as it was."""
    record = os.path.join(workdir, provenance.RECORD_FILE)
    before = open(record).read()
    with pytest.raises(ConfigError, match="Nothing was changed") as err:
        provenance.check_and_record(workdir, provenance.artifact_inputs(cfg, digests))
    assert open(record).read() == before
    return set(re.findall(r"^  (\w+) \(", str(err.value), flags=re.M))


def test_unchanged_inputs_reuse_everything_and_a_fresh_workdir_is_recorded(cfg, tmp_path):
    workdir = str(tmp_path / "run")
    inputs = provenance.artifact_inputs(cfg, _digests())
    provenance.check_and_record(workdir, inputs)
    _hold(workdir, *provenance.ARTIFACTS)
    provenance.check_and_record(workdir, provenance.artifact_inputs(cfg, _digests()))
    with open(os.path.join(workdir, provenance.RECORD_FILE)) as f:
        assert json.load(f)["artifacts"] == json.loads(json.dumps(inputs))
    # Settings the artifacts do not read (evaluation breadth, a stage's own config: checked by the stage run).
    cfg.eval.sampled_answers_per_question = 9
    cfg.ppo.train.steps = 3
    provenance.check_and_record(workdir, provenance.artifact_inputs(cfg, _digests()))


def test_a_change_refuses_the_artifacts_it_reaches_and_names_what_changed(cfg, tmp_path):
    workdir = str(tmp_path / "run")
    provenance.check_and_record(workdir, provenance.artifact_inputs(cfg, _digests()))
    _hold(workdir, *provenance.ARTIFACTS)
    everything = set(provenance.ARTIFACTS)

    cfg.tokenizer.dummy_prefix = not cfg.tokenizer.dummy_prefix
    assert _refused(workdir, cfg, _digests()) == everything
    cfg.tokenizer.dummy_prefix = not cfg.tokenizer.dummy_prefix

    assert _refused(workdir, cfg, _digests(pretrain='{"text": "another corpus"}\n')) == everything
    assert _refused(workdir, cfg, _digests(sft_train='{"messages": []}\n')) == {"sft", "labels", "reward", "ppo"}
    assert _refused(workdir, cfg, _digests(rm_prompts='{"prompt": "?"}\n')) == {"labels", "reward", "ppo"}
    assert _refused(workdir, cfg, _digests(ppo_prompts='{"prompt": "?"}\n')) == {"ppo"}

    cfg.labels.k = int(cfg.labels.k) + 2
    with pytest.raises(ConfigError) as err:
        provenance.check_and_record(workdir, provenance.artifact_inputs(cfg, _digests()))
    message = str(err.value)
    assert f"labels.k: {cfg.labels.k - 2} -> {cfg.labels.k}" in message
    assert "the labels artifact it builds on changes" in message  # the reward model's reason
    assert f"rm -r {workdir}/labels {workdir}/reward {workdir}/ppo" in message
    assert f"{workdir}/sft" not in message


def test_deleting_what_the_error_lists_rebuilds_it_with_the_new_inputs(cfg, tmp_path):
    workdir = str(tmp_path / "run")
    provenance.check_and_record(workdir, provenance.artifact_inputs(cfg, _digests()))
    _hold(workdir, *provenance.ARTIFACTS)
    cfg.labels.k = int(cfg.labels.k) + 2
    new_inputs = provenance.artifact_inputs(cfg, _digests())
    for rel in ("labels/rankings_train.jsonl", "reward"):  # part of what it listed: still refused for ppo
        path = os.path.join(workdir, rel)
        os.remove(path) if os.path.isfile(path) else os.rmdir(path)
    with pytest.raises(ConfigError, match=r"  ppo \(ppo\)"):
        provenance.check_and_record(workdir, new_inputs)
    os.rmdir(os.path.join(workdir, "ppo"))
    provenance.check_and_record(workdir, new_inputs)
    with open(os.path.join(workdir, provenance.RECORD_FILE)) as f:
        assert json.load(f)["artifacts"]["labels"]["labels.k"] == cfg.labels.k


def test_a_workdir_from_before_the_record_is_accepted_and_an_unreadable_record_is_refused(cfg, tmp_path):
    workdir = str(tmp_path / "run")
    _hold(workdir, "tokenizer", "pretrain")
    provenance.check_and_record(workdir, provenance.artifact_inputs(cfg, _digests()))
    assert os.path.exists(os.path.join(workdir, provenance.RECORD_FILE))
    with open(os.path.join(workdir, provenance.RECORD_FILE), "w") as f:
        f.write("{not json")
    with pytest.raises(ConfigError, match="inputs.json is unreadable"):
        provenance.check_and_record(workdir, provenance.artifact_inputs(cfg, _digests()))
