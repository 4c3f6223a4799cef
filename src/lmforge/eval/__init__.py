"""Evaluation: perplexity family, log-likelihood and generative tasks, contamination tests,
pairwise judging, the lm-evaluation-harness adapter, and the run's report card.

Modules are imported on demand (the harness adapter needs the optional `lm-eval` package):
`loglik` (Scorer), `perplexity`, `tasks`, `readers` (load_task), `generative`, `contamination`,
`judge`, `harness`, `report`, `stats`, `loading`, `cli`. See docs/evaluation.md.
"""
