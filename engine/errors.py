"""Errors a user can act on. Each message names the problem and the fix."""

from __future__ import annotations


class CodelensError(Exception):
    """Base class: a problem with the job's inputs or environment, reported without a traceback."""


class SpecError(CodelensError):
    """The job spec is invalid (field path, bad value, what is allowed)."""


class ModelLoadError(CodelensError):
    """The model directory cannot be loaded safely (missing files, pickle weights, remote code)."""


class UnsupportedArchitectureError(CodelensError):
    """The model's architecture has no entry in the model-surgery table."""


class SelfCheckError(CodelensError):
    """The lens at the last layer does not reproduce the model's own logits."""


class CorpusError(CodelensError):
    """The corpus cannot be read (no file matches a glob, unreadable file, missing field)."""


class RunDirError(CodelensError):
    """The output directory cannot be used (not writable, or holds a different job)."""
