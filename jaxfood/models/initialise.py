"""Initial parameters of a Flax module without compiling a random number generator per parameter.

``module.init`` under ``jit`` inlines one threefry hash (the parameter's key) and one random
draw per parameter, and XLA's CPU backend generates code for each of them: the tiny fine-tuning
model's initialisation compiled for as long as its training step (7-10 s). :func:`init_params`
gives the same arrays, bit for bit, another way:

1. ``jax.eval_shape(module.init)`` (tracing only, nothing compiled) records, for every parameter
   Flax creates, its place in the tree, the static data Flax folds into the key
   (``flax.core.scope._fold_in_static``) and the initialiser with its arguments;
2. each parameter is then drawn by its initialiser, jitted on its own, from the key Flax would
   have made. One program per initialiser and shape serves every parameter of that kind (zeros
   and ones are made on the host, with no program).

The record of step 1 depends only on the module and the shapes of the arguments, so it is kept
for later calls. Where the recipe does not apply -- a parameter drawn from a key other than
``rng`` or from traced values, a call under ``jit`` -- it falls back to the compiled
``module.init``; the result is the same either way (``tests/test_initialise.py``).

The same patch of ``Scope.param`` makes ``apply`` cheaper to trace: Flax checks every existing
parameter against the shape of its initialiser's output, which it traces anew in every call; the
shape is kept instead, per initialiser and arguments.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import errors as flax_errors
from flax.core import meta as flax_meta
from flax.core import scope as flax_scope

from jaxfood.compile_cache import KeptCache, shared_program

_LOCAL = threading.local()
_ORIGINAL_PARAM = flax_scope.Scope.param
_ORIGINAL_FOLD = flax_scope._fold_in_static
#: Recorded initialisations and per-draw programs, kept apart from shared_program's few large
#: programs (these are many and small).
_PLANS = KeptCache(256)
_DRAWS = KeptCache(256)
#: The abstract value of each initialiser (and arguments) that an existing parameter is checked against.
_ABSTRACT = KeptCache(1024)


@dataclasses.dataclass(frozen=True)
class _Draw:
    """One parameter: where it goes, how its key is made from the root key, and how it is drawn."""

    path: tuple[str, ...]
    fold_data: tuple
    init_fn: Callable
    args: tuple
    kwargs: dict


class _Unsupported(Exception):
    """A parameter whose key :func:`init_params` cannot remake."""


def _recording_fold(rng, data):
    records = getattr(_LOCAL, "records", None)
    if records is not None:
        _LOCAL.last_fold = (rng, tuple(data))
    return _ORIGINAL_FOLD(rng, data)


def _recording_param(self, name, init_fn, *init_args, unbox=True, **init_kwargs):
    if self.has_variable("params", name):
        # Flax checks an existing parameter against ``jax.eval_shape`` of its initialiser, which
        # traces the random draw again in every ``apply``: an eighth of the time to trace the tiny
        # model's training step, up to a third once the rest is warm. That shape depends only on the
        # initialiser and its arguments: it is traced once per process, and the parameter is
        # checked against it as Flax does.
        abstract = _ABSTRACT.get((_identity(init_fn), init_args, init_kwargs), lambda: jax.eval_shape(
            lambda: init_fn(jax.random.key(0), *init_args, **init_kwargs)))
        self.reserve(name, "params")  # the rest as Flax's own Scope.param
        value = self.get_variable("params", name)
        if unbox:
            value = flax_meta.unbox(value)
        for val, abs_val in zip(jax.tree_util.tree_leaves(value), jax.tree_util.tree_leaves(abstract)):
            if np.shape(val) != np.shape(abs_val):
                raise flax_errors.ScopeParamShapeError(name, self.path_text, np.shape(val), np.shape(abs_val))
        return value
    records = getattr(_LOCAL, "records", None)
    if records is None or not self.is_mutable_collection("params"):
        return _ORIGINAL_PARAM(self, name, init_fn, *init_args, unbox=unbox, **init_kwargs)

    def recorded(key, *args, **kwargs):
        rng, data = getattr(_LOCAL, "last_fold", (None, ()))
        _LOCAL.last_fold = (None, ())
        if rng is not _LOCAL.root or not data:
            raise _Unsupported(f"parameter {'/'.join(self.path + (name,))}: key not folded from the root key")
        records.append(_Draw(tuple(self.path) + (name,), data, init_fn, args, kwargs))
        return init_fn(key, *args, **kwargs)

    return _ORIGINAL_PARAM(self, name, recorded, *init_args, unbox=unbox, **init_kwargs)


# Installed once: outside a recording (any other thread, any other call) both behave as Flax's own.
flax_scope.Scope.param = _recording_param
flax_scope._fold_in_static = _recording_fold


_DYNAMIC = "<array>"  # the place of an array argument among the static ones


def _is_static(x) -> bool:
    return x is None or isinstance(x, (bool, int, float, str))


def _split(args: tuple) -> tuple[tuple, tuple]:
    """``(static, dynamic)``: Python scalars stay values (sizes a module reads), the rest are
    arrays (only their shapes matter)."""
    return (tuple(a if _is_static(a) else _DYNAMIC for a in args),
            tuple(None if _is_static(a) else a for a in args))


def _merge(static: tuple, dynamic: tuple) -> tuple:
    return tuple(d if s is _DYNAMIC else s for s, d in zip(static, dynamic))


def _plan(module, rng, static, dynamic, kwargs) -> tuple[list[_Draw], Any] | None:
    """The parameters ``module.init`` draws, in order, and the abstract ``params`` tree; ``None``
    where the recipe does not apply."""
    records: list[_Draw] = []

    def traced(key, dyn, kw):
        _LOCAL.records, _LOCAL.root, _LOCAL.last_fold = records, key, (None, ())
        try:
            return module.init(key, *_merge(static, dyn), **kw)
        finally:
            _LOCAL.records = _LOCAL.root = None
            _LOCAL.last_fold = (None, ())

    try:
        variables = jax.eval_shape(traced, rng, dynamic, kwargs)
    except Exception:  # noqa: BLE001 -- e.g. a key not folded from the root: the compiled path
        return None
    if set(variables) != {"params"}:
        return None
    return records, variables["params"]


def _signature(tree) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return str(treedef), tuple((np.shape(x), str(getattr(x, "dtype", type(x).__name__))) for x in leaves)


def _identity(fn) -> tuple:
    """What makes ``fn`` the initialiser it is: its code and the values it closes over (Flax
    builds a new closure for every parameter; equal ones share one program)."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return fn  # described by identity (compile_cache.static_signature)
    cells = tuple(c.cell_contents for c in (fn.__closure__ or ()))
    return ("function", fn.__module__, fn.__qualname__, code.co_filename, code.co_firstlineno, cells)


def _draw_program(draw: _Draw):
    """``key -> draw.init_fn(key, *args, **kwargs)`` jitted, one per initialiser and shape: the
    draw compiles as it does inside ``jit(module.init)`` (the same constants folded the same way,
    hence the same bits), once for all the parameters it makes."""
    key = (_identity(draw.init_fn), draw.args, draw.kwargs)
    return _DRAWS.get(key, lambda: jax.jit(lambda k: draw.init_fn(k, *draw.args, **draw.kwargs)))


#: Initialisers that draw nothing: their arrays are made on the host, with no program at all.
_CONSTANT = {jax.nn.initializers.zeros: np.zeros, jax.nn.initializers.ones: np.ones}


def _draw(draw: _Draw, rng):
    constant = _CONSTANT.get(draw.init_fn)
    if constant is not None:
        shape, dtype = (list(draw.args) + [None, None])[:2]
        shape, dtype = draw.kwargs.get("shape", shape), draw.kwargs.get("dtype", dtype)
        return jnp.asarray(constant(shape, dtype if dtype is not None else jnp.float32))
    return _draw_program(draw)(_ORIGINAL_FOLD(rng, draw.fold_data))


def _replay(plan, rng) -> dict | None:
    draws, abstract = plan
    params: dict = {}
    try:
        for draw in draws:
            node = params
            for part in draw.path[:-1]:
                node = node.setdefault(part, {})
            node[draw.path[-1]] = _draw(draw, rng)
    except Exception:  # noqa: BLE001 -- an initialiser that only works traced: the compiled path
        return None
    if _signature(params) != _signature(abstract):
        return None
    return params


def init_params(module, rng, *args, **kwargs) -> dict[str, Any]:
    """``module.init(rng, *args, **kwargs)["params"]``, the same arrays, without compiling the
    initialisation as one program (module docstring). Array arguments are only read for their
    shapes; Python scalars (sizes) are taken as they are."""
    static, dynamic = _split(args)
    if not isinstance(rng, jax.core.Tracer):
        key = (module, static, _signature((dynamic, kwargs)), _signature(rng))
        plan = _PLANS.get(key, lambda: _plan(module, rng, static, dynamic, kwargs))
        if plan is not None:
            params = _replay(plan, rng)
            if params is not None:
                return params
    program = shared_program("init_program", (module, static), lambda: jax.jit(
        lambda key, dyn, kw: module.init(key, *_merge(static, dyn), **kw)["params"]))
    return program(rng, dynamic, kwargs)
