"""The reward server: scores rollouts (correctness, visual-token savings, format) over HTTP."""
