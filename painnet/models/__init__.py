"""Models: the deep conv-attention decoder and classical baselines."""
