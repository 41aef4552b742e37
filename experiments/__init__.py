"""The command-line binaries (``python -m experiments.<name>``, or the ``gptjax-*`` console scripts)."""

from gptjax.cli import pin_cpu_without_accelerator

# Before any binary imports JAX: on a machine without TPU or GPU, keep JAX from probing an installed libtpu.
pin_cpu_without_accelerator()
