"""Tuning: strategies propose configs, a runner runs trials, the tuner judges and stops."""
