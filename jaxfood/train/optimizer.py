"""The fine-tuning optimizer: one AdamW per parameter group, built from optax parts.

Parameters are labelled by the first key of their path -- ``encoder``, each head (``classifier``,
``nutrient_head``, ``food_projection``, ``salient_pool``) and ``task_weighting`` -- and
``optax.multi_transform`` gives every group its own learning rate, schedule, weight decay and
gradient clipping. The encoder's learning rate is 0 for the first ``freeze_encoder_steps``
optimizer steps (heads warm up on a fixed pretrained encoder). ``optax.MultiSteps`` accumulates
gradients over ``accumulation_steps`` calls before each update (the mean of the micro-batch
gradients, so 4 micro-batches of equal size equal one step on their union).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

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


def make_schedule(group: GroupConfig, total_steps: int, frozen_steps: int = 0) -> optax.Schedule:
    """Learning rate as a function of the optimizer step (0 while frozen)."""
    lr = float(group.learning_rate)
    span = max(int(total_steps) - frozen_steps, 1)
    warm = min(max(int(group.warmup_steps), 0), span - 1) if group.schedule == "warmup_cosine" else 0
    if group.schedule == "warmup_cosine" and warm == 0:
        warm = max(1, span // 10) if span > 1 else 0
    if group.schedule == "constant":
        base = optax.constant_schedule(lr)
    elif group.schedule == "cosine":
        base = optax.cosine_decay_schedule(lr, span, alpha=group.end_factor)
    elif group.schedule == "linear":
        base = optax.linear_schedule(lr, lr * group.end_factor, span)
    else:
        base = optax.warmup_cosine_decay_schedule(0.1 * lr, lr, warm, span, end_value=lr * group.end_factor)
    if frozen_steps <= 0:
        return base

    def schedule(count):
        return jnp.where(count < frozen_steps, 0.0, base(jnp.maximum(count - frozen_steps, 0)))

    return schedule


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> tuple[optax.GradientTransformation, dict]:
    """``(tx, schedules)``: the full transformation and each group's learning-rate schedule."""
    schedules: dict[str, optax.Schedule] = {}
    transforms: dict[str, optax.GradientTransformation] = {}
    for name in GROUPS:
        group: GroupConfig = getattr(cfg, name)
        frozen = cfg.freeze_encoder_steps if name == "encoder" else 0
        schedules[name] = make_schedule(group, total_steps, frozen)
        parts = []
        if group.clip_norm and group.clip_norm > 0:
            parts.append(optax.clip_by_global_norm(group.clip_norm))
        parts.append(optax.adamw(schedules[name], eps=group.eps, weight_decay=group.weight_decay))
        transforms[name] = optax.chain(*parts)
    tx: optax.GradientTransformation = optax.multi_transform(transforms, param_labels)
    if cfg.accumulation_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=int(cfg.accumulation_steps))
    return tx, schedules


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
    optimizer = optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm),
                            optax.adamw(schedule, weight_decay=cfg.weight_decay))
    return optimizer, schedule
