"""Stage 3: PPO(-ptx). ``objective``: the losses and per-token quantities; ``loop``: rollouts and updates;
``stage``: the runner and the registry record; ``bench``: how the benchmark times one iteration."""
