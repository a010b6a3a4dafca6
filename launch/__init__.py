"""Launchers: the fault-tolerant per-host agent (:mod:`launch.agent`)."""
