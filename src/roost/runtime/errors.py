"""Errors an operator can cause and fix: reported as one line, never as a traceback."""

from __future__ import annotations


class RoostError(Exception):
    """A failure with a message meant for the operator (bad input, unusable destination...)."""


class ManifestError(RoostError):
    """A manifest that is malformed, unsafe or inconsistent."""


class IntegrityError(RoostError):
    """Data that does not match the hashes or sizes a manifest promises."""


class StoreError(RoostError):
    """A destination that cannot be used as asked (not a store, busy, unknown release...)."""
