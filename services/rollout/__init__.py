"""Rollouts on pruned visual tokens: score, select per budget, generate in vLLM (``pruned``)."""
