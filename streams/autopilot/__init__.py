"""Closed-loop retraining: training from the live topics (``fraudstream retrain``) and the
process that retrains on drift, learner error, new labels or a schedule, and rolls a
better challenger out through shadow and canary (``fraudstream autopilot``)."""
