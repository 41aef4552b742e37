"""Print every preset's parameter count (from the module's own shapes) next to the paper's figure.

    python -m experiments.model_info [--presets=gpt3-175b,gpt2-small]

Nothing is allocated: counts come from jax.eval_shape of the Flax init.
"""

from absl import flags

from gptjax import cli
from gptjax.model import count_params
from gptjax.presets import PRESETS, get_preset

_PRESETS = flags.DEFINE_list("presets", None, "Presets to show (default: all).")


def main(argv):
    del argv
    names = _PRESETS.value or list(PRESETS)
    print(f"{'preset':<12} {'layers':>6} {'d_model':>7} {'heads':>9} {'params':>12} {'non-emb':>12} "
          f"{'paper':>9} {'Δ':>7}  source")
    for name in names:
        p = get_preset(name)
        c = p.config
        n = count_params(c)
        paper = f"{p.paper_params / 1e6:,.0f}M" if p.paper_params else "-"
        delta = f"{100 * (n['total'] / p.paper_params - 1):+.2f}%" if p.paper_params else "-"
        print(f"{name:<12} {c.num_layers:>6} {c.d_model:>7} {f'{c.num_heads}x{c.head_dim}':>9} "
              f"{n['total'] / 1e6:>11,.1f}M {n['non_embedding'] / 1e6:>11,.1f}M {paper:>9} {delta:>7}  "
              f"{p.source}{'; ' + p.note if p.note else ''}")


def run():
    """Console-script entry point (``gptjax-model-info``)."""
    cli.run(main)


if __name__ == "__main__":
    run()
