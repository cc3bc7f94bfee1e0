"""Errors of the converter: user errors (exit 2) in the jaxfood sense."""

from __future__ import annotations

from jaxfood.errors import CheckpointError

INSTALL_HINT = 'pip install "jaxfood[convert]"'


class ConvertError(CheckpointError):
    """A checkpoint that cannot be converted as asked; the message names the key and both shapes."""


class TorchMissingError(ConvertError):
    """PyTorch (and PyTorch Geometric for ``--verify``) is an optional dependency."""
