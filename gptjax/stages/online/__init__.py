"""The online RL stages' shared machinery: one rollout/update loop (``loop``) that runs any ``Algorithm``
(``algorithm``: PPO, GRPO, RLOO), the reward source (``rewards``: a reward model or a Python function), what their
runners build from a config the same way (``stage``) and how the benchmark times an iteration (``bench``)."""
