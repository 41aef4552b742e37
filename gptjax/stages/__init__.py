"""The stages of the recipe, one module (or package) each, and what they share.

``registry`` holds one ``Stage`` record per stage and is where every caller looks a stage up; ``pretrain``,
``sft``, ``reward``, ``ppo`` (objective, runner, loop), ``grpo``, ``rloo``, ``dpo`` and ``rejection_sampling``
("rs") register themselves there. ``common``
builds tokenizers and model configs from a config and loads parameters from a run; ``rl`` holds GAE, whitening,
the KL controllers and sequence rewards; ``online`` the RL loop PPO, GRPO and RLOO share and their reward sources;
``reference`` what analysis reports of a policy trained from a reference (KL to it); ``rollouts`` samples and
scores many responses on the host.
"""
