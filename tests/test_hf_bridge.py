"""``experiments.hf``: transformers GPT-2 in, a few SFT steps, policy and reward model out, checked by transformers.

The independent reference is transformers itself: a random-weight GPT2LMHeadModel (GPT-2 BPE vocabulary, made
offline) gives the logits the import must reproduce (1e-4); the exported policy, loaded with
``GPT2LMHeadModel.from_pretrained`` and ``AutoTokenizer``, must render our chat prompts to our token ids and
generate greedily the tokens ``gptjax.sampling`` generates; the exported reward model, loaded as its README says,
must give ``ScoreModel.reward``'s scores (1e-4). Everything runs through the real binaries.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from gptjax import assets, sampling, sharding
from gptjax.data import chat

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
pytestmark = pytest.mark.skipif(not os.path.isfile(assets.gpt2_bpe_path()),
                                reason="the GPT-2 BPE asset is missing: python -m gptjax.assets fetch gpt2_bpe")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["Is 27 a prime number?", "Name a colour.", "What is 2 + 2?", "Say hello in French.", "Why is the sky blue?"]
ENV = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")


def run(*args, timeout=300) -> str:
    out = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    return out.stdout


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("hf_bridge")


@pytest.fixture(scope="module")
def hf_model(root):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():  # every weight random (LayerNorms included), so a mis-mapped tensor shows in the logits
        for name, param in model.named_parameters():
            base = 1.0 if ".ln_" in f".{name}" and name.endswith("weight") else 0.0
            param.copy_(base + 0.1 * torch.randn_like(param))
    model.eval().save_pretrained(root / "gpt2_random")
    return model


@pytest.fixture(scope="module")
def imported(root, hf_model):
    out = run("experiments.hf", "import", f"--hf_dir={root / 'gpt2_random'}", f"--workdir={root / 'imported'}")
    assert "imported" in out
    return root / "imported"


@pytest.fixture(scope="module")
def sft_run(root, imported):
    conversations = [[{"role": "user", "content": p}, {"role": "assistant", "content": f"Answer {k}: yes."}]
                     for k, p in enumerate(PROMPTS * 2)]
    path = root / "sft.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    run("experiments.train", "--config=configs/sft.py", f"--workdir={root / 'sft'}",
        f"--config.train.init_from={imported}", f"--config.data.train_path={path}", "--config.train.steps=3",
        "--config.train.batch_size=2", "--config.train.seq_len=64", "--config.optim.lr=1e-3",
        "--config.train.sample_prompts=()")
    return root / "sft"


def test_import_reproduces_the_transformers_logits(imported, hf_model):
    from gptjax.stages.registry import load_policy

    model, params, tokenizer, stage = load_policy(str(imported))
    assert stage == "pretrain" and model.cfg.vocab_size == 50304 and tokenizer.name == "gpt2"
    tokens = np.random.default_rng(0).integers(0, 50257, (2, 64), dtype=np.int32)
    with torch.no_grad():
        expected = hf_model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
    ours = np.asarray(jax.jit(lambda p, t: model.apply({"params": p}, t)[0])(params, jnp.asarray(tokens)))
    assert expected.std() > 0.3
    assert np.abs(ours[..., :50257] - expected).max() <= 1e-4


def greedy_ours(model, params, tokenizer, prompt_ids, max_new):
    sampler = sampling.make_sampler(model, sampling.SamplingConfig(
        max_new_tokens=max_new, temperature=0.0, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
        vocab_size=tokenizer.vocab_size))
    tokens, valid = sampling.left_pad([prompt_ids], tokenizer.pad_id)
    out = jax.device_get(sampler(params, tokens, valid, jax.random.key(0)))
    return np.asarray(out.tokens_BN)[0][np.asarray(out.mask_BN)[0]].tolist()


def test_exported_policy_generates_our_greedy_tokens(root, sft_run):
    from gptjax.stages.registry import load_policy

    out = run("experiments.hf", "export", f"--workdir={sft_run}", f"--out={root / 'sft_hf'}")
    assert "GPT2LMHeadModel" in out
    model, params, tokenizer, _ = load_policy(str(sft_run))
    hf = transformers.GPT2LMHeadModel.from_pretrained(root / "sft_hf").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(root / "sft_hf")
    assert hf.config.vocab_size == tokenizer.vocab_size == 50263 and len(hf_tok) == 50263
    for prompt in PROMPTS:
        ids = chat.render_prompt(chat.user_turn(prompt), tokenizer).tolist()
        rendered = hf_tok.apply_chat_template(chat.user_turn(prompt), add_generation_prompt=True,
                                              return_dict=True)["input_ids"]
        assert list(rendered) == ids
        assert hf_tok.decode(tokenizer.encode(prompt)) == prompt
        ours = greedy_ours(model, params, tokenizer, ids, max_new=12)
        with torch.no_grad():
            generated = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
        if tokenizer.eos_id in generated:
            generated = generated[:generated.index(tokenizer.eos_id) + 1]
        assert generated == ours, prompt


def test_exported_reward_model_scores_like_ours(root, imported):
    from gptjax.data.chat import render
    from gptjax.model import ScoreModel
    from gptjax.stages import common
    from gptjax.stages.reward import load_reward_params

    rankings = [{"prompt": p, "responses": [f"A good answer to {k}.", "bad"]} for k, p in enumerate(PROMPTS)]
    path = root / "rankings.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rankings))
    run("experiments.train", "--config=configs/reward.py", f"--workdir={root / 'rm'}",
        f"--config.train.init_from={imported}", f"--config.data.train_path={path}", "--config.train.steps=2",
        "--config.train.batch_size=2", "--config.train.seq_len=64")
    run("experiments.hf", "export", f"--workdir={root / 'rm'}", f"--out={root / 'rm_hf'}")

    readme = (root / "rm_hf" / "README.md").read_text()
    snippet = readme.split("```python\n")[1].split("```")[0]
    namespace: dict = {}
    exec(snippet, namespace)  # the documented loading code, as a user would run it
    stored = ml_collections.ConfigDict(json.loads((root / "rm" / "config.json").read_text()))
    tokenizer = common.build_tokenizer(stored.tokenizer)
    conversation = [{"role": "user", "content": "Is 27 prime?"}, {"role": "assistant", "content": "No: 27 = 3 x 9."}]
    ids, _ = render(conversation, tokenizer)
    assert namespace["ids"][0].tolist() == ids.tolist()

    model = ScoreModel(common.build_model_config(stored.model, tokenizer, 64))
    params = load_reward_params(str(root / "rm"), common.abstract_params_of(
        model, sharding.make_mesh((-1, 1, 1))), "rm")
    ours = model.apply({"params": params}, jnp.asarray(ids[None]), jnp.ones((1, len(ids)), bool),
                       method=ScoreModel.reward)
    assert abs(float(ours[0]) - float(namespace["score"][0])) <= 1e-4
