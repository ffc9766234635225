"""Measuring a model under a plan: simulation, evaluation, sensitivity and its calibration,
verification, the one-layer report, replaying decoder blocks."""
