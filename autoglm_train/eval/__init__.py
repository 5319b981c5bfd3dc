"""Evaluation: text metrics (WER, CER, digit accuracy) and greedy-generation evaluation of plugins."""
