"""Preference alignment: preference data, reward models, DPO-family / ORPO losses, PPO and GRPO.

Everything trains through the one engine (`lmforge.train.engine.Trainer`); what this package
adds is data, objectives and, for the RL methods, the rollout loop around the engine's
optimizer step.
"""
