"""Look inside a run's checkpoint (any stage); writes OUT/report.md, OUT/analysis.json and PNG plots.

    python -m experiments.analyze --workdir=workdirs/demo/sft
    python -m experiments.analyze --workdir=workdirs/demo/ppo --compare=workdirs/demo/sft --kl_prompts=prompts.jsonl
    python -m experiments.analyze --workdir=workdirs/demo/reward --answers_file=answers.jsonl --split=train
    python -m experiments.analyze --workdir=workdirs/demo/pretrain --prompts="問：27 是不是質數？\\n答："

Always: parameter counts per module, weight norms per layer, update norms per layer (between the last two kept
checkpoints), loss on --split (LM runs: the stored data's held-out/train split, PPO: its SFT run's demonstrations;
reward runs: K-wise ranking loss and pairwise accuracy). Policies (pretrain, SFT, PPO): samples for --prompts.
Reward runs: scores of the answers in --answers_file (JSONL {"prompt", "response"} or {"prompt", "responses"}).
PPO runs: KL(policy ‖ reference = train.init_from) on --kl_prompts. --compare: the per-layer relative difference to
another run or checkpoint. Computation: gptjax/tools/analysis.py.
"""

import os

from absl import flags

from gptjax import cli
from gptjax.tools import analysis

_WORKDIR = flags.DEFINE_string("workdir", None, "The run to analyse (its workdir).", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to analyse (default: the latest).")
_COMPARE = flags.DEFINE_string("compare", "", "Another run, its checkpoints/ or a step dir to compare with.")
_SPLIT = flags.DEFINE_enum("split", "eval", list(analysis.SPLITS), "Split for the loss: eval (held out) or train.")
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", None, "LM batches to score (default: the run's eval_batches).")
_PROMPTS = flags.DEFINE_list("prompts", None, "Comma-separated prompts to sample (policies); \\n is a line break.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Sampling temperature for --prompts (0 = greedy).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens sampled per prompt.")
_ANSWERS = flags.DEFINE_string("answers_file", "", "JSONL answers to score with a reward model.")
_KL_PROMPTS = flags.DEFINE_string("kl_prompts", "", "JSONL prompts for KL(policy ‖ reference); default: the PPO "
                                                    "run's data.prompts_path.")
_KL_NUM = flags.DEFINE_integer("kl_num_prompts", 64, "Prompts (one sampled response each) for the KL.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_OUT = flags.DEFINE_string("out", None, "Output directory (default: WORKDIR/analysis).")


def run(workdir: str, out: str | None = None, **options) -> dict:
    """The whole job: analyse, write the report; returns the analysis (what analysis.json holds)."""
    result = analysis.analyze(workdir, analysis.Options(**options))
    out = out or os.path.join(result["workdir"], "analysis")
    paths = analysis.write_report(result, out)
    print(f"wrote {', '.join(paths)}")
    return result


def main(argv):
    del argv
    prompts = [p.replace("\\n", "\n") for p in _PROMPTS.value] if _PROMPTS.value else None
    run(_WORKDIR.value, _OUT.value, step=_STEP.value, compare=_COMPARE.value, split=_SPLIT.value,
        eval_batches=_EVAL_BATCHES.value, prompts=prompts, temperature=_TEMPERATURE.value,
        max_new_tokens=_MAX_NEW.value, answers_file=_ANSWERS.value, kl_prompts=_KL_PROMPTS.value,
        kl_num_prompts=_KL_NUM.value, seed=_SEED.value)


if __name__ == "__main__":
    cli.run(main)
