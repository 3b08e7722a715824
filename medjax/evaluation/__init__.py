"""Evaluation: exam accuracy, perplexity and KV-cache generation, as pure functions of a
model's (cfg, params)."""
