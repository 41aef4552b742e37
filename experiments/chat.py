"""Chat with a trained policy (SFT or PPO run; a pretraining run works too), streaming its tokens.

    python -m experiments.chat --workdir=workdirs/demo/ppo [--temperature=0.7] [--system="You are ..."]

Multi-turn: the model sees the whole conversation, rendered with the template SFT trained on. /reset, /quit.
A workdir without a policy checkpoint ends in one error line (``--verbose``: with the traceback).
"""

from absl import flags

from gptjax import cli
from gptjax.stages.registry import load_policy
from gptjax.tools.chat_session import ChatSession, run_repl

_WORKDIR = flags.DEFINE_string("workdir", None, "The run whose last checkpoint to chat with.", required=True)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "Longest answer.")
_SYSTEM = flags.DEFINE_string("system", "", "Optional system turn.")


def main(argv):
    del argv
    model, params, tokenizer, stage = load_policy(_WORKDIR.value)
    print(f"loaded the {stage} policy from {_WORKDIR.value}")
    run_repl(ChatSession(model, params, tokenizer, system=_SYSTEM.value, temperature=_TEMPERATURE.value,
                         max_new_tokens=_MAX_NEW.value))


def run():
    """Console-script entry point (``gptjax-chat``)."""
    cli.run(main)


if __name__ == "__main__":
    run()
