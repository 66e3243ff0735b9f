"""Runs from a recipe: teacher, PTQ, QAD / QAT training, checkpoints (see :mod:`.run`)."""

from .run import run

__all__ = ["run"]
