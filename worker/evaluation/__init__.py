"""Evaluation: tasks, correctness labels, detectors and calibration metrics."""
