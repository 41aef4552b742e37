"""The seed world, "27 是不是質數？": its generator and gold labeler, the whole recipe run on it (pretrain → SFT →
labels → reward model → PPO) with its evaluation, and the reward over-optimisation study."""
