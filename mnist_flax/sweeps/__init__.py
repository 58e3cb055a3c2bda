"""Sweeps: search spaces, the Optuna study (patience, heartbeat, the trial's reporter) and the worker.

Imports the layers below; a trial is its own `main.py` process.
"""
