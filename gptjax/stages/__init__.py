"""The stages of the recipe, one module (or package) each, and what they share.

``registry`` holds one ``Stage`` record per stage and is where every caller looks a stage up; ``pretrain``,
``sft``, ``reward`` and ``ppo`` (objective, runner, loop) register themselves there. ``common`` builds tokenizers
and model configs from a config and loads parameters from a run; ``rl`` holds GAE, whitening and the KL
controllers; ``rollouts`` samples and scores many responses on the host.
"""
