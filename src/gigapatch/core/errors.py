"""User-facing errors.

Every error a user can cause (a bad file, a bad value, a typo in a config) is raised as a
:class:`GigapatchError` whose message names the culprit (file, key, value) and says what to do.
The CLI prints these as one clear message instead of a traceback.
"""

from __future__ import annotations


class GigapatchError(Exception):
    """An error caused by user input, with a message meant to be read by a person."""


class ConfigError(GigapatchError, ValueError):
    """A configuration key or value is wrong (typo, out of range, wrong type)."""


class DataError(GigapatchError):
    """An input file or label is missing, corrupt or out of range."""


class TrainingDiverged(GigapatchError):
    """The loss or the gradients stopped being finite (NaN/inf): training cannot go on."""
