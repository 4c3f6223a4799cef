"""Evaluation: perplexity family, log-likelihood and generative tasks, contamination tests,
pairwise judging, the lm-evaluation-harness adapter, and the run's report card.

Modules are imported on demand (the harness adapter needs the optional `lm-eval` package):
`loglik` (Scorer), `perplexity`, `tasks`, `evaluate`, `readers` (load_task), `specs`, `items`,
`generative`, `contamination`, `judge`, `harness`, `report`, `stats`, `cli`. Models are opened by
`lmforge.serve.loading`, the one inference loader. See docs/evaluation.md.
"""
