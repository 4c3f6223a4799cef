"""Supervised fine-tuning data beyond the chat format itself: training rows, packing, batches."""
