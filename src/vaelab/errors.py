"""Typed errors. Every failure a user can cause is one of these; the CLI prints it as one line."""

from __future__ import annotations


class VaelabError(Exception):
    """Base class: a problem with the user's input, files or environment (CLI exit code 2)."""


class DataError(VaelabError):
    """A data file or data set is missing, unreadable, corrupted or fails its checksum."""


class ConfigError(VaelabError):
    """A configuration value is out of range or unknown."""


class CheckpointError(VaelabError):
    """A checkpoint or run folder is missing, incomplete, altered or of the wrong kind."""


class SpecMismatch(CheckpointError):
    """A checkpoint or run holds a model other than the one expected (kind or shape).

    Unlike a damaged checkpoint, which a resume may skip for an older one, this is a mix-up
    of runs: callers let it through rather than fall back.
    """


class NumericalError(VaelabError):
    """Training produced a NaN or Inf loss."""
