"""Hugging Face bridge: ``python -m experiments.hf import|export``.

    python -m experiments.hf import --hf_dir=gpt2/ --workdir=workdirs/gpt2      # transformers GPT-2 -> gptjax run
    python -m experiments.train --config=configs/sft.py --config.train.init_from=workdirs/gpt2 ...
    python -m experiments.hf export --workdir=workdirs/sft --out=exported/sft   # policy -> GPT2LMHeadModel dir

``import`` reads a ``GPT2LMHeadModel`` directory (model.safetensors, sharded safetensors, or pytorch_model.bin
loaded with weights_only) and writes a finished checkpoint with its config (model fields and the GPT-2 BPE
tokenizer) that any stage's ``train.init_from`` accepts. ``export`` writes a pretraining/SFT/PPO policy as a
``GPT2LMHeadModel`` directory with tokenizer files (chat specials and the chat template included), or a
reward-model run as a ``GPT2Model`` backbone plus ``score_head.safetensors`` and a README with the code that
reads its scores (see gptjax/hf_bridge.py). Bad input ends in one error line and exit status 1.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from gptjax import cli

_HF_DIR = flags.DEFINE_string("hf_dir", None, "import: the transformers GPT-2 directory to read.")
_WORKDIR = flags.DEFINE_string("workdir", None, "import: the run directory to write; export: the run to export.")
_OUT = flags.DEFINE_string("out", None, "export: the new directory to write.")
_SCAN = flags.DEFINE_bool("scan_layers", True, "import: store layers stacked for nn.scan (the gptjax default).")
COMMANDS = ("import", "export")


def import_run(hf_dir: str, workdir: str, scan_layers: bool = True) -> str:
    from configs import pretrain
    from gptjax import hf_bridge
    from gptjax.tokenizers import make_tokenizer
    from gptjax.train import checkpoint as ckpt_lib, workdir as workdir_lib

    tokenizer = make_tokenizer("gpt2")
    cfg, params = hf_bridge.import_params(hf_dir, tokenizer, scan_layers=scan_layers)
    run = pretrain.base_config("gpt2-small")
    run.model.update(hf_bridge.model_fields(cfg))
    run.train.seq_len = min(int(run.train.seq_len), cfg.max_len)
    run.train.steps = 0
    workdir_lib.check_or_write_config(workdir, run)
    ckpt = ckpt_lib.Checkpointer(workdir, keep=1, async_save=False)
    ckpt.save(0, {"params": params}, data_state=None, config=workdir_lib.config_to_dict(run),
              extras={"imported_from": os.path.abspath(hf_dir)})
    ckpt.close()
    return f"imported {hf_dir} ({cfg.num_layers} layers, d_model {cfg.d_model}, vocab {cfg.vocab_size}) into {workdir}"


def export_run(workdir: str, out: str) -> str:
    import jax
    import ml_collections

    from gptjax import hf_bridge, sharding
    from gptjax.model import ScoreModel
    from gptjax.stages import common, registry
    from gptjax.stages.reward import load_reward_params
    from gptjax.train import checkpoint as ckpt_lib

    stored = ml_collections.ConfigDict(ckpt_lib.checkpoint_config(workdir))
    if registry.stage_name(stored) != "reward":
        model, params, tokenizer, stage = registry.load_policy(workdir)
        hf_bridge.export_policy(jax.device_get(params), model.cfg, tokenizer, out)
        return f"exported the {stage} policy of {workdir} to {out} (GPT2LMHeadModel)"
    tokenizer = common.build_tokenizer(stored.tokenizer)
    cfg = common.build_model_config(stored.model, tokenizer, int(stored.train.seq_len))
    model = ScoreModel(common.no_dropout(cfg))
    abstract = common.abstract_params_of(model, sharding.make_mesh((-1, 1, 1)))
    params = load_reward_params(workdir, abstract, "--workdir")
    hf_bridge.export_reward(jax.device_get(params), model.cfg, tokenizer, out)
    return f"exported the reward model of {workdir} to {out} (GPT2Model + {hf_bridge.SCORE_HEAD_FILE}, see README.md)"


def main(argv):
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"give one command, {' or '.join(COMMANDS)}: python -m experiments.hf import "
                             f"--hf_dir=DIR --workdir=RUN | export --workdir=RUN --out=DIR")
    from gptjax.errors import ConfigError

    needed = {"import": {"--hf_dir": _HF_DIR.value, "--workdir": _WORKDIR.value},
              "export": {"--workdir": _WORKDIR.value, "--out": _OUT.value}}[argv[1]]
    missing = [name for name, value in needed.items() if not value]
    if missing:
        sys.exit(f"error: {argv[1]} needs {', '.join(missing)}")
    try:
        if argv[1] == "import":
            print(import_run(_HF_DIR.value, _WORKDIR.value, _SCAN.value))
        else:
            print(export_run(_WORKDIR.value, _OUT.value))
    except ValueError as e:  # a checkpoint the bridge cannot read (gptjax.hf names the file and the problem)
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(str(e)) from None


def run():
    """Console-script entry point (``gptjax-hf``)."""
    cli.run(main)


if __name__ == "__main__":
    run()
