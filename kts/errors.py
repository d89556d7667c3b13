"""Errors raised for bad user input.

Every error names the offending file (or manifest row) and the problem, so that a
reader of a traceback in a notebook knows what to fix without opening the code.
"""
from __future__ import annotations

import os


class KtsInputError(ValueError):
    """Bad input: ``source`` is the file, folder or manifest row; ``problem`` says what is wrong."""

    def __init__(self, source: object, problem: str):
        self.source = os.fspath(source) if isinstance(source, os.PathLike) else str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")


class DicomError(KtsInputError):
    """A DICOM file or series that cannot be used (corrupt, no pixels, mixed series...)."""


class MaskError(KtsInputError):
    """A ground-truth or predicted mask that does not fit its image."""


class ManifestError(KtsInputError):
    """A row or column of ``data_manifest.csv`` that breaks the schema."""


class FetchError(KtsInputError):
    """A download that failed or did not verify."""
