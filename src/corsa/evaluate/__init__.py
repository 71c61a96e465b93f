"""Evaluation of edited models: prompt-level metrics, and (later) benchmark runners."""
