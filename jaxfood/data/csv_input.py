"""Reading users' CSV/TSV files under the bad-input policy of :mod:`jaxfood.data.readers`.

Every reader of a table goes through :func:`read_csv` (delimiter sniffed, duplicate columns
refused, encoding problems named) and checks its cells with :func:`numeric_column`,
:func:`id_strings` and :func:`unique_ids`: a problem that makes the data unusable raises
:class:`~jaxfood.errors.UserError` naming the file, the column, the 1-based line (the header is
line 1) and what was expected; one the data survives is a :class:`DataWarning` (:func:`warn`).
"""

from __future__ import annotations

import csv
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from jaxfood.errors import UserError


class DataWarning(UserWarning):
    """A problem in the input that the data survives (counted; the CLI prints these)."""


def warn(message: str) -> None:
    warnings.warn(" ".join(message.split()), DataWarning, stacklevel=3)


def examples(items: Sequence, k: int = 3) -> str:
    items = list(items)
    shown = ", ".join(f"'{x}'" for x in items[:k])
    return shown + (f", ... ({len(items) - k} more)" if len(items) > k else "")



def check_file(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: {what} not found")
    if not path.is_file():
        raise UserError(f"{path}: {what} must be a file")
    return path


def sniff_delimiter(path: Path) -> str:
    """The delimiter: the one of ',', tab and ';' that splits the header line most (a '.csv' saved by
    a spreadsheet in a ';' locale, or tab-separated), else the extension's ('.tsv': tab, else ',')."""
    default = "\t" if path.suffix.lower() in (".tsv", ".tab", ".txt") else ","
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            header = f.readline()
    except (OSError, UnicodeDecodeError):
        return default  # the reader names the problem
    counts = {sep: header.count(sep) for sep in (",", "\t", ";")}
    best = max(counts, key=lambda sep: (counts[sep], sep == default))
    return best if counts[best] > 0 else default


def _read_header(path: Path, sep: str) -> list[str]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        try:
            return next(csv.reader(f, delimiter=sep))
        except StopIteration:
            raise UserError(f"{path}: file is empty (expected a header line)") from None
        except UnicodeDecodeError as err:
            raise UserError(f"{path}: {_encoding_problem(path, err)}") from None
        except csv.Error as err:
            raise UserError(f"{path}: cannot be read as CSV ({err})") from None


def _encoding_problem(path: Path, err: UnicodeDecodeError) -> str:
    """Names the encoding a spreadsheet or Windows tool most likely saved instead of UTF-8."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        found = "UTF-16 text"
    else:
        found = f"not UTF-8 text (byte 0x{err.object[err.start]:02x} at position {err.start}; e.g. Latin-1 or binary)"
    return f"{found}; expected a UTF-8 CSV (re-save it as 'CSV UTF-8')"


def read_csv(path: Path, what: str, **kwargs) -> tuple[pd.DataFrame, list[str]]:
    """Reads a CSV/TSV, refusing duplicate column names (pandas would silently rename them)."""
    path = check_file(path, what)
    sep = sniff_delimiter(path)
    header = [h.strip() for h in _read_header(path, sep)]
    seen: set[str] = set()
    for col in header:
        if col and col in seen:
            raise UserError(f"{path}: column '{col}' appears more than once (expected unique column names)")
        seen.add(col)
    try:
        df = pd.read_csv(path, sep=sep, encoding="utf-8-sig", **kwargs)
    except pd.errors.EmptyDataError:
        raise UserError(f"{path}: file is empty (expected a header line and data rows)") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as err:
        msg = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: cannot be parsed as CSV ({msg})") from None
    df.columns = [str(c).strip() for c in df.columns]
    if len(df) == 0:
        raise UserError(f"{path}: no data rows (expected at least one row after the header)")
    return df, header


def require_columns(df: pd.DataFrame, path: Path, columns: Sequence[str], hint: str = "") -> None:
    for col in columns:
        if col not in df.columns:
            extra = f"; {hint}" if hint else ""
            raise UserError(f"{path}: missing column '{col}'{extra}")


def numeric_column(df: pd.DataFrame, col: str, path: Path, *, allow_nan: bool, allow_negative: bool,
                    what: str = "a number") -> np.ndarray:
    """Column as float64; a non-numeric/negative/inf cell raises naming column and line."""
    raw = df[col]
    values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64)
    bad = np.isnan(values) & raw.notna().to_numpy()
    if bad.any():
        i = int(np.nonzero(bad)[0][0])
        raise UserError(f"{path}: column '{col}', line {i + 2}: value {str(raw.iloc[i])!r} is not {what}")
    if not allow_nan and np.isnan(values).any():
        i = int(np.nonzero(np.isnan(values))[0][0])
        raise UserError(f"{path}: column '{col}', line {i + 2}: empty or NaN value (expected {what})")
    if np.isinf(values).any():
        i = int(np.nonzero(np.isinf(values))[0][0])
        raise UserError(f"{path}: column '{col}', line {i + 2}: value '{str(raw.iloc[i]).strip()}' is infinite "
                        f"(expected {what})")
    if not allow_negative and (values < 0).any():
        i = int(np.nonzero(values < 0)[0][0])
        raise UserError(f"{path}: column '{col}', line {i + 2}: value {values[i]:g} is negative (expected {what} >= 0)")
    return values


def id_strings(values) -> list[str]:
    """Identifiers as strings; floats that are whole numbers lose their '.0' (NDB 9003.0 -> '9003')."""
    out = []
    for v in values:
        if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA:
            out.append("")
        elif isinstance(v, (float, np.floating)) and float(v).is_integer():
            out.append(str(int(v)))
        else:
            s = str(v).strip()
            if re.fullmatch(r"-?\d+\.0+", s):
                s = s.split(".")[0]
            out.append(s)
    return out


def unique_ids(ids: list[str], path: Path, column: str, what: str) -> None:
    seen: dict[str, int] = {}
    for i, x in enumerate(ids):
        if x == "":
            raise UserError(f"{path}: column '{column}', line {i + 2}: empty {what} (expected a value)")
        if x in seen:
            raise UserError(
                f"{path}: column '{column}', line {i + 2}: duplicate {what} '{x}' (first on line {seen[x] + 2}; expected unique values)"
            )
        seen[x] = i
