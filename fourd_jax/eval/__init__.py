"""Evaluation: generation over records, answer extraction, per-sub-task accuracy."""
