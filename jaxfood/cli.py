"""The ``jaxfood`` command.

Subcommands live in :mod:`jaxfood.commands`, one module each, exposing ``NAME``, ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``; they are discovered here, so adding a command
touches no other file. Modules import heavy dependencies (JAX) inside ``run`` so that ``--help``
stays fast.

Errors a user can cause are :class:`jaxfood.errors.UserError`: printed as one ``error:`` line
on stderr with exit status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import os
import pkgutil
import sys
import traceback
import warnings
from collections.abc import Sequence

import jaxfood.commands as commands_pkg
from jaxfood.errors import UserError

#: Order in which subcommands are listed in --help (others follow alphabetically).
ORDER = ("simulate", "build-graph", "pretrain", "finetune", "evaluate", "embed", "predict")


def _command_modules():
    mods = []
    for info in pkgutil.iter_modules(commands_pkg.__path__):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{commands_pkg.__name__}.{info.name}")
        if hasattr(mod, "NAME") and hasattr(mod, "run"):
            mods.append(mod)
    rank = {n: i for i, n in enumerate(ORDER)}
    return sorted(mods, key=lambda m: (rank.get(m.NAME, len(ORDER)), m.NAME))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxfood",
        description=(
            "Food metabolomics with a heterogeneous graph attention network in JAX: simulate or "
            "read data, build the Sample-Molecule-Food-Nutrient graph, pretrain (GraphCL), "
            "fine-tune three tasks, evaluate, embed and predict."
        ),
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument("--no-compile-cache", action="store_true",
                        help="do not keep compiled programs in ~/.cache/jaxfood/xla (env JAXFOOD_NO_COMPILE_CACHE=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _command_modules():
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP),
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks for errors")
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def format_warning(message, category, filename, lineno, line=None) -> str:
    """``warning: <message>`` -- what a user can act on, not the file and line that raised it."""
    return f"warning: {' '.join(str(message).split())}\n"


def run_command(run, args, debug: bool) -> int:
    """Runs ``run(args)``, mapping user errors to one line on stderr and exit status 2; warnings are
    printed as ``warning: ...`` lines (with ``--debug`` in Python's format, file and line).
    Compiled programs are kept on disk between commands (:mod:`jaxfood.compile_cache`) unless
    ``args.no_compile_cache``; the garbage collector runs less often (``collect_less``)."""
    from jaxfood.compile_cache import collect_less, enable_compile_cache

    enable_compile_cache(disabled=getattr(args, "no_compile_cache", False))
    collect_less()
    saved = warnings.formatwarning
    if not debug:
        warnings.formatwarning = format_warning
    try:
        return int(run(args) or 0)
    except UserError as err:
        if debug:
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = saved


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    return run_command(args._run, args, getattr(args, "debug", False))


def entry() -> None:
    """The console script: :func:`main`, then the exit handlers (temporary files and logging are
    closed there; the commands close their checkpointers and TensorBoard writers themselves), then
    the process ends without the interpreter's teardown: freeing JAX's compiled programs and every
    module one by one takes ~0.4 s, an eighth of a warm ``jaxfood predict``. Threads still running
    are not waited for (no command leaves one). An uncaught exception (a bug) still ends the usual
    way, with its traceback."""
    status = main()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, ValueError):  # e.g. `jaxfood predict --json | head`: the reader left
            pass
    os._exit(status)


if __name__ == "__main__":
    entry()
