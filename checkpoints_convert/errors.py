"""Errors of the converter: user errors (exit 2) in the jaxfood sense."""

from __future__ import annotations

from pathlib import Path

from jaxfood.errors import CheckpointError


def install_hint() -> str:
    """The command that installs the ``[convert]`` extra: editable from a source checkout."""
    if (Path(__file__).resolve().parents[1] / "setup.cfg").is_file():
        return 'pip install -e ".[convert]"'
    return 'pip install "jaxfood[convert]"'


INSTALL_HINT = install_hint()


class ConvertError(CheckpointError):
    """A checkpoint that cannot be converted as asked; the message names the key and both shapes."""


class TorchMissingError(ConvertError):
    """PyTorch (and PyTorch Geometric for ``--verify``) is an optional dependency."""
