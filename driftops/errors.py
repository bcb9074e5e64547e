"""Errors raised by driftops. Every message says what was wrong and what to pass instead."""

from __future__ import annotations


class DriftopsError(ValueError):
    """Invalid input or an unrecoverable numerical failure, with a message that says how to fix it."""


class DivergenceError(DriftopsError):
    """A flow or a training run produced non-finite values (the step size or learning rate is too large)."""
