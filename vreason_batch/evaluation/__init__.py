"""Scoring answers against ground truth, and reports over a run's results."""
