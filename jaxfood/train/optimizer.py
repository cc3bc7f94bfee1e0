"""The fine-tuning optimizer: one AdamW per parameter group, built from optax parts.

Parameters are labelled by the first key of their path -- ``encoder``, each head (``classifier``,
``nutrient_head``, ``food_projection``, ``salient_pool``) and ``task_weighting`` -- and
``optax.multi_transform`` gives every group its own learning rate, schedule, weight decay and
gradient clipping. The encoder's learning rate is 0 for the first ``freeze_encoder_steps``
optimizer steps (heads warm up on a fixed pretrained encoder; with all steps frozen, the pretrained
probe); that number is optimizer state, so it does not change the compiled step. ``optax.MultiSteps`` accumulates
gradients over ``accumulation_steps`` calls before each update (the mean of the micro-batch
gradients, so 4 micro-batches of equal size equal one step on their union).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

GROUPS: tuple[str, ...] = ("encoder", "classifier", "nutrient_head", "food_projection", "salient_pool",
                           "task_weighting", "wide")
#: Leaves with this name (the heads' linear paths on the intensity profile) form the ``wide`` group.
WIDE_LEAF = "wide_kernel"


@dataclasses.dataclass(frozen=True)
class GroupConfig:
    """Optimisation of one parameter group.

    ``schedule``: constant | cosine | warmup_cosine | linear (decay to ``end_factor`` x the learning
    rate over the run; ``warmup_steps`` of linear warm-up first where used). ``eps``: Adam's
    epsilon; gradients far below it move a parameter by much less than the learning rate (Adam
    otherwise turns the rounding noise of gradients that are 0 in theory -- e.g. attention over
    identical messages -- into full-size steps, which makes runs differ across program layouts).
    """

    learning_rate: float = 3e-3
    schedule: Literal["constant", "cosine", "warmup_cosine", "linear"] = "constant"
    warmup_steps: int = 0
    end_factor: float = 0.1
    weight_decay: float = 1e-4
    clip_norm: float = 1.0
    eps: float = 1e-6


def _group(lr: float, wd: float = 1e-4, schedule: str = "constant") -> Callable[[], GroupConfig]:
    return lambda: GroupConfig(learning_rate=lr, weight_decay=wd, schedule=schedule)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Per-group settings, encoder freezing and gradient accumulation (steps count optimizer updates)."""

    encoder: GroupConfig = dataclasses.field(default_factory=_group(2e-3, 1e-4, "warmup_cosine"))
    classifier: GroupConfig = dataclasses.field(default_factory=_group(5e-3))
    nutrient_head: GroupConfig = dataclasses.field(default_factory=_group(5e-3))
    food_projection: GroupConfig = dataclasses.field(default_factory=_group(5e-3))
    salient_pool: GroupConfig = dataclasses.field(default_factory=_group(5e-3))
    task_weighting: GroupConfig = dataclasses.field(default_factory=_group(2e-2, 0.0))
    #: The linear paths on the intensity profile (every ``wide_kernel`` leaf, whichever head it is
    #: in): a convex problem with ~1,500 features x 65 foods and ~6 samples a food. Adam at the
    #: heads' 5e-3 moves every weight by about the learning rate each step whatever its gradient
    #: (sign descent), which is noise in 10^5 weights: 150 steps at 1e-3 with the loss's L2 reach
    #: the logistic regression's test accuracy, 5e-3 does not (docs/experiments.md). No decoupled
    #: weight decay: the L2 is in the loss (``loss.wide_l2``).
    wide: GroupConfig = dataclasses.field(default_factory=_group(1e-3, 0.0))
    freeze_encoder_steps: int = 0
    accumulation_steps: int = 1


def param_labels(params: Any) -> Any:
    """The group label of every leaf: the first key of its path (``wide`` for :data:`WIDE_LEAF` leaves)."""

    def label(path, _):
        last = path[-1]
        if getattr(last, "key", getattr(last, "name", None)) == WIDE_LEAF:
            return "wide"
        key = path[0]
        name = getattr(key, "key", getattr(key, "name", str(key)))
        if name not in GROUPS:
            raise ValueError(f"parameter '{name}' belongs to no optimizer group {GROUPS}")
        return name

    return jax.tree_util.tree_map_with_path(label, params)


def _warmup_steps(group: GroupConfig, span, xp=jnp):
    """Warm-up length of ``warmup_cosine`` over ``span`` steps: ``warmup_steps`` (at most ``span - 1``),
    or a tenth of the span where that is 0."""
    warm = xp.clip(int(group.warmup_steps), 0, span - 1)
    return xp.where(warm == 0, xp.where(span > 1, xp.maximum(span // 10, 1), 0), warm)


def schedule_value(group: GroupConfig, count, span, xp=jnp):
    """``group``'s learning rate at step ``count`` of a schedule ``span`` steps long: optax's
    ``constant_schedule``, ``cosine_decay_schedule``, ``linear_schedule`` and
    ``warmup_cosine_decay_schedule`` (from a tenth of the rate), written so that ``count`` and
    ``span`` may be traced (``xp``: ``jnp``; ``np`` on the host). The tests compare it with optax."""
    lr, end = float(group.learning_rate), float(group.end_factor)
    count = xp.asarray(count, xp.float32)
    span = xp.maximum(xp.asarray(span, xp.int32), 1)
    if group.schedule == "constant":
        return xp.full_like(count, lr)
    if group.schedule == "cosine":
        return _cosine(lr, xp.minimum(count, span) / span, end, xp)
    if group.schedule == "linear":
        frac = 1.0 - xp.clip(count, 0, span) / span
        return (lr - lr * end) * frac + lr * end
    warm = _warmup_steps(group, span, xp)
    start = 0.1 * lr
    rising = start + (lr - start) * xp.clip(count, 0, warm) / xp.maximum(warm, 1)
    decay = span - warm  # >= 1
    falling = _cosine(lr, xp.minimum(count - warm, decay) / decay, end if lr != 0.0 else 0.0, xp)
    return xp.where(count < warm, rising, falling)


def _cosine(lr: float, t, alpha: float, xp):
    """optax's cosine decay from ``lr`` to ``alpha * lr`` at the fraction ``t`` of its span."""
    return lr * ((1.0 - alpha) * 0.5 * (1.0 + xp.cos(xp.pi * t)) + alpha)


def group_rate(group: GroupConfig, total_steps: int, count, frozen_steps, xp=jnp):
    """Learning rate at optimizer step ``count``: 0 for the first ``frozen_steps``, then the
    group's schedule over the remaining ``total_steps - frozen_steps``."""
    span = xp.maximum(int(total_steps) - xp.asarray(frozen_steps, xp.int32), 1)
    value = schedule_value(group, xp.maximum(xp.asarray(count, xp.int32) - frozen_steps, 0), span, xp)
    return xp.where(xp.asarray(count) < frozen_steps, 0.0, value).astype(xp.float32)


def squared_norm(tree) -> jax.Array:
    """Sum of the squares of every entry of ``tree`` (the squared global norm): one product of the
    concatenated leaves, a few operations in a compiled step instead of three per leaf."""
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    vector = jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in leaves])
    return jnp.dot(vector, vector)


class ScheduleState(NamedTuple):
    count: jax.Array   # optimizer steps taken
    frozen: jax.Array  # steps without movement at the start (the encoder's ``freeze_encoder_steps``)


def flat(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner`` (elementwise but for global norms) on one vector of all the leaves it is given.
    The same updates as ``inner`` on the tree, in a program with a few operations in all instead
    of a few per leaf: the optimizer was a quarter of the compiled multi-task step. A group
    without leaves keeps its (empty) tree: checkpoints cannot hold arrays of size 0."""

    def init(params):
        return inner.init(ravel_pytree(params)[0] if jax.tree_util.tree_leaves(params) else params)

    def update(updates, state, params=None):
        if not jax.tree_util.tree_leaves(updates):
            return inner.update(updates, state, params)
        vector, unravel = ravel_pytree(updates)
        new, state = inner.update(vector, state, None if params is None else ravel_pytree(params)[0])
        return unravel(new), state

    return optax.GradientTransformation(init, update)


def scale_by_group_schedule(group: GroupConfig, total_steps: int, frozen_steps: int = 0) -> optax.GradientTransformation:
    """Multiplies updates by ``-group_rate``. The number of frozen steps is state, not a constant
    of the program: runs that freeze the encoder for a while, for the whole run (the pretrained
    probe) or not at all compile to one program."""

    def init(params):
        del params
        return ScheduleState(jnp.zeros([], jnp.int32), jnp.asarray(frozen_steps, jnp.int32))

    def update(updates, state, params=None):
        del params
        rate = group_rate(group, total_steps, state.count, state.frozen)
        updates = jax.tree_util.tree_map(lambda u: (-rate * u).astype(u.dtype), updates)
        return updates, ScheduleState(optax.safe_int32_increment(state.count), state.frozen)

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> tuple[optax.GradientTransformation, dict]:
    """``(tx, schedules)``: the full transformation and each group's learning rate as a host
    function of the optimizer step (for the logs). Per group: global-norm clipping, then AdamW
    (``scale_by_adam``, decoupled weight decay, the group's schedule). ``freeze_encoder_steps``
    is set in the state ``tx.init`` returns; ``tx.update`` is the same for every value of it."""
    schedules: dict[str, Callable[[int], float]] = {}
    transforms: dict[str, optax.GradientTransformation] = {}
    for name in GROUPS:
        group: GroupConfig = getattr(cfg, name)
        frozen = cfg.freeze_encoder_steps if name == "encoder" else 0
        schedules[name] = partial(_host_rate, group, int(total_steps), int(frozen))
        parts = []
        if group.clip_norm and group.clip_norm > 0:
            parts.append(optax.clip_by_global_norm(group.clip_norm))
        parts += [optax.scale_by_adam(eps=group.eps), optax.add_decayed_weights(group.weight_decay),
                  scale_by_group_schedule(group, total_steps, frozen)]
        transforms[name] = flat(optax.chain(*parts))
    tx: optax.GradientTransformation = optax.multi_transform(transforms, param_labels)
    if cfg.accumulation_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=int(cfg.accumulation_steps))
    return tx, schedules


def _host_rate(group: GroupConfig, total_steps: int, frozen_steps: int, count: int) -> float:
    return float(group_rate(group, total_steps, count, frozen_steps, xp=np))


def learning_rates(schedules: dict, optimizer_step) -> dict[str, Any]:
    """Each group's learning rate at ``optimizer_step``."""
    return {name: fn(optimizer_step) for name, fn in schedules.items()}


def make_graphcl_optimizer(cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """GraphCL's optimizer: AdamW (Loshchilov & Hutter 2019) with linear warmup then cosine decay,
    after global-norm clipping. ``cfg``: a :class:`~jaxfood.train.graphcl.PretrainConfig`."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=cfg.learning_rate * cfg.final_lr_fraction)
    optimizer = flat(optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm),
                                 optax.adamw(schedule, weight_decay=cfg.weight_decay)))
    return optimizer, schedule
