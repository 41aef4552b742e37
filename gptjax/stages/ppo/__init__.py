"""Stage 3: PPO(-ptx). ``objective``: the losses and per-token quantities; ``loop``: rollouts and updates."""
