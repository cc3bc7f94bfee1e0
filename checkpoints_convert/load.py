"""Safe loading of PyTorch checkpoints.

Files are read with ``torch.load(..., weights_only=True)``: tensors, dicts, lists and plain values
only, never code. The single class added to PyTorch's allow-list is
``torch.nn.parameter.UninitializedParameter``: PyG's ``GATConv(edge_dim=0)`` creates a *lazy*
``lin_edge`` that stays uninitialised when the relation has no edge attributes, and
``torch.save`` writes it as that class (constructing it runs no user code).

A loaded file is classified into a :class:`TorchCheckpoint`: the state dict (tensors as numpy
arrays, uninitialised parameters as :data:`UNINITIALIZED`) and its envelope (the GraphCL dict's
``config`` and ``graph_path``, or the name of the wrapper key of a fine-tuning checkpoint).
"""

from __future__ import annotations

import dataclasses
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from checkpoints_convert.errors import INSTALL_HINT, ConvertError, TorchMissingError


class _Uninitialized:
    """Marker for a lazy parameter saved before its shape was known (PyG ``edge_dim=0``)."""

    def __repr__(self) -> str:
        return "UNINITIALIZED"

    shape = None
    dtype = None


UNINITIALIZED = _Uninitialized()

#: Keys under which training scripts commonly nest a model's state dict.
STATE_DICT_KEYS = ("encoder_state", "model_state", "model_state_dict", "state_dict", "model")


def require_torch():
    """Imports torch or raises :class:`TorchMissingError` with the install command."""
    try:
        import torch
    except ImportError:
        raise TorchMissingError(
            f"PyTorch is needed to read or write .pt checkpoints but is not installed; install it with: {INSTALL_HINT}"
        ) from None
    return torch


def require_pyg():
    try:
        import torch_geometric  # noqa: F401
    except ImportError:
        raise TorchMissingError(
            f"--verify needs PyTorch Geometric, which is not installed; install it with: {INSTALL_HINT}"
        ) from None


@dataclasses.dataclass
class TorchCheckpoint:
    """A loaded checkpoint.

    Attributes:
      path: the file.
      state: key -> numpy array (or :data:`UNINITIALIZED`), in file order.
      dtypes: key -> torch dtype name (``float32``), for an exact export.
      format: ``"graphcl"`` (``{"encoder_state", "config", "graph_path"}``), ``"wrapped"``
        (``{<wrapper_key>: state_dict, ...}``) or ``"state_dict"`` (a bare state dict).
      wrapper_key: the key holding the state dict (``encoder_state``, ``model_state``, ...).
      config: the checkpoint's ``config`` dict when present.
      envelope: JSON-able top-level entries other than the state dict (kept for ``--to-torch``).
    """

    path: Path
    state: dict[str, Any]
    dtypes: dict[str, str]
    format: str
    wrapper_key: str | None = None
    config: dict[str, Any] | None = None
    envelope: dict[str, Any] = dataclasses.field(default_factory=dict)


def _refusal(path: Path, err: Exception) -> ConvertError:
    text = str(err)
    found = re.findall(r"GLOBAL ([\w.]+)", text) or re.findall(r"Unsupported global: ([\w.]+)", text)
    what = f" (it references {', '.join(sorted(set(found)))})" if found else ""
    return ConvertError(
        f"{path}: refused: loading it needs arbitrary Python code{what}, which an untrusted pickle can "
        "abuse; jaxfood reads checkpoints with torch.load(weights_only=True), so only tensors, dicts, "
        "lists and plain values are accepted. Re-save it from the original project as "
        "torch.save({'encoder_state': model.state_dict(), 'config': dict(...)}, path)"
    )


def load_torch_file(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` with every failure as a one-line :class:`ConvertError`."""
    torch = require_torch()
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path}: file not found (expected a PyTorch checkpoint written by torch.save)")
    from torch.nn.parameter import UninitializedParameter

    try:
        with torch.serialization.safe_globals([UninitializedParameter]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        operand = re.search(r"Unsupported operand \d+", text)
        if operand or "weights_only" not in text:  # not a pickle at all (text, JSON, truncated file)
            detail = operand.group(0) if operand else _first_line(err)
            raise ConvertError(f"{path}: not a PyTorch checkpoint written by torch.save ({detail})") from None
        raise _refusal(path, err) from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError, AttributeError,
            TypeError, KeyError) as err:
        raise _unreadable(path, err) from None


def _unreadable(path: Path, err: Exception) -> ConvertError:
    """A file torch.load cannot read: say 'not complete' when it is a cut-off torch.save archive."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    truncated = isinstance(err, EOFError)
    if head == b"PK\x03\x04":  # torch.save's zip format; its central directory is written last
        try:
            with zipfile.ZipFile(path) as archive:
                truncated = truncated or archive.testzip() is not None
        except (zipfile.BadZipFile, OSError, EOFError):
            truncated = True
    if truncated:
        return ConvertError(f"{path}: not a complete PyTorch checkpoint ({path.stat().st_size} bytes: the torch.save archive is cut "
                            "off or damaged, e.g. an unfinished copy or save); copy or save it again")
    return ConvertError(f"{path}: not a PyTorch checkpoint written by torch.save ({_first_line(err)})")


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    if not text:
        return type(err).__name__
    # torch's reader appends a paragraph of advice after its first sentence ("This is an internal ...").
    first = text[0].split(". This is")[0]
    return f"{type(err).__name__}: {first}"


def _is_tensor(x: Any) -> bool:
    torch = require_torch()
    return isinstance(x, torch.Tensor)


def _is_state_dict(x: Any) -> bool:
    return (isinstance(x, dict) and len(x) > 0 and all(isinstance(k, str) for k in x)
            and all(_is_tensor(v) for v in x.values()))


def tensor_to_numpy(t: Any) -> tuple[Any, str]:
    """A tensor as a numpy array (exact copy) and its torch dtype name."""
    torch = require_torch()
    from torch.nn.parameter import UninitializedParameter

    if isinstance(t, UninitializedParameter):
        return UNINITIALIZED, "uninitialized"
    dtype = str(t.dtype).replace("torch.", "")
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.to(torch.float32).numpy().copy(), dtype
    return t.numpy().copy(), dtype


def _jsonable(x: Any) -> bool:
    if x is None or isinstance(x, (bool, int, float, str)):
        return True
    if isinstance(x, (list, tuple)):
        return all(_jsonable(v) for v in x)
    if isinstance(x, dict):
        return all(isinstance(k, str) and _jsonable(v) for k, v in x.items())
    return False


def classify(obj: Any, path: Path) -> TorchCheckpoint:
    """Finds the state dict inside a loaded object; anything else is 'not a checkpoint'."""
    fmt, wrapper, sd, envelope = None, None, None, {}
    if _is_state_dict(obj):
        fmt, sd = "state_dict", obj
    elif isinstance(obj, dict):
        for key in STATE_DICT_KEYS:
            if key in obj and _is_state_dict(obj[key]):
                wrapper, sd = key, obj[key]
                fmt = "graphcl" if key == "encoder_state" else "wrapped"
                break
        if sd is not None:
            envelope = {k: v for k, v in obj.items() if k != wrapper and isinstance(k, str) and _jsonable(v)}
    if sd is None:
        if isinstance(obj, dict):
            what = f"a dict with keys {sorted(map(str, obj))[:8]}"
        else:
            what = f"a {type(obj).__name__}"
        raise ConvertError(
            f"{path}: not a model checkpoint: found {what}; expected a state dict (parameter name -> "
            f"tensor) or a dict holding one under one of {list(STATE_DICT_KEYS)}")
    state, dtypes = {}, {}
    for k, v in sd.items():
        state[k], dtypes[k] = tensor_to_numpy(v)
    config = envelope.get("config") if isinstance(envelope.get("config"), dict) else None
    return TorchCheckpoint(path=path, state=state, dtypes=dtypes, format=fmt, wrapper_key=wrapper,
                           config=config, envelope=envelope)


def load_checkpoint(path: str | Path) -> TorchCheckpoint:
    """Loads and classifies a ``.pt`` file (see :class:`TorchCheckpoint`)."""
    path = Path(path)
    return classify(load_torch_file(path), path)


def numpy_to_tensor(x: Any, dtype: str):
    """Inverse of :func:`tensor_to_numpy` (bit-exact)."""
    torch = require_torch()
    if x is UNINITIALIZED or dtype == "uninitialized":
        from torch.nn.parameter import UninitializedParameter

        return UninitializedParameter()
    t = torch.from_numpy(np.ascontiguousarray(x))
    want = getattr(torch, dtype, None)
    if want is not None and t.dtype != want:
        t = t.to(want)
    return t
