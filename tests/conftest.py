"""Shared fixtures: one smoke-sized seed-world pipeline per test session (pretrain, SFT, labels, RM, PPO).

Several modules (pipeline, analysis, over-optimisation) read its runs; building it once keeps `make test`
within its time budget.
"""

import json
import os

import pytest

from configs import chatgpt as chatgpt_config
from gptjax.seed_world import pipeline


@pytest.fixture(scope="session")
def smoke_pipeline(tmp_path_factory) -> str:
    """Workdir of a finished smoke pipeline (configs/chatgpt.py:smoke, seed 0)."""
    workdir = str(tmp_path_factory.getbasetemp() / "smoke_pipeline")
    if not os.path.exists(os.path.join(workdir, "results.json")):
        pipeline.run_pipeline(chatgpt_config.get_config("smoke"), workdir)
    return workdir


@pytest.fixture(scope="session")
def smoke_results(smoke_pipeline) -> dict:
    with open(os.path.join(smoke_pipeline, "results.json"), encoding="utf-8") as f:
        return json.load(f)
