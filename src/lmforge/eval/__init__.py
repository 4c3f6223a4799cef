"""Evaluation: perplexity family first; tasks, contamination and reports build on it."""
