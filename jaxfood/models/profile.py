"""A sample's own intensity profile, as the chemometrics baselines see it, and linear maps of it.

The features are those of :mod:`jaxfood.eval.baselines` (logistic regression, ridge): per sample,
``log1p(1e4 * area / TIC)`` over its molecules (0 where a molecule is absent), then standardised
per molecule with the mean and standard deviation over the *training* samples
(``sample_split == 0``; ``StandardScaler`` fitted on the training rows). The graph stores
``z = (log1p(area) - mean[m]) / std[m]`` on its ``contains_molecule`` edges with the statistics in
``meta.normalisation["contains_molecule"]``, so the areas are recovered exactly; graphs without
those statistics use the edge attribute shifted to be positive, as the baselines do
(:func:`jaxfood.eval.pipeline.raw_peak_areas`).

Used twice: the wide (linear) path of the classifier and the nutrient head, which therefore
contain the logistic regression / ridge baselines as a special case, and the ``profile`` input
mode of Sample nodes in the encoder (a sample's input is a linear map of its own profile:
inductive, a new sample embeds from its own measurements).

Only the edges that are on count (``edge_mask``): a sample restricted to some of its molecules is
a sample in which only those were detected (its TIC is theirs). The standardisation statistics
always come from every edge of the training samples, never from a perturbed view.

Everything is computed from the edges (segment sums); where ``[samples x molecules]`` is small
(:data:`DENSE_LIMIT`) the linear map is one dense matrix product (faster on CPU).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxfood.graph import schema
from jaxfood.graph.hetero_graph import SPLIT_CODES
from jaxfood.graph.sampling import padding_edge_masks

Array = Any

#: Per 10,000 of the TIC before ``log1p``; the constant of :mod:`jaxfood.eval.baselines`.
TIC_SCALE = 1.0e4
#: Largest [samples x molecules] for which the linear map uses a dense matrix.
DENSE_LIMIT = 16_000_000


@flax.struct.dataclass
class SampleProfile:
    """Standardised intensity profiles of the graph's samples, kept sparse (one value per edge).

    ``values`` [E] ``log1p(1e4 area / TIC)`` of each (sample, molecule) edge (0 on masked edges);
    ``samples`` / ``molecules`` [E] its endpoints; ``mean`` / ``scale`` [M] the per-molecule
    training statistics. The standardised profile of sample s is ``(x_s - mean) / scale`` with
    ``x_s`` the dense row of ``values`` (absent molecules 0).
    """

    values: Array
    samples: Array
    molecules: Array
    mean: Array
    scale: Array
    num_samples: int = flax.struct.field(pytree_node=False)
    num_molecules: int = flax.struct.field(pytree_node=False)

    def linear(self, kernel: Array) -> Array:
        """``[S, M] standardised profile @ kernel [M, D]`` -> [S, D], without the dense matrix
        where it would be large: ``sum_e v_e kernel[m_e] / scale[m_e] - (mean / scale) @ kernel``."""
        kernel = kernel.astype(jnp.float32)
        scaled = kernel / self.scale[:, None]
        offset = (self.mean / self.scale) @ kernel
        if self.num_samples * self.num_molecules <= DENSE_LIMIT:
            matrix = jnp.zeros((self.num_samples, self.num_molecules), jnp.float32)
            matrix = matrix.at[self.samples, self.molecules].add(self.values)
            return matrix @ scaled - offset[None, :]
        return jax.ops.segment_sum(self.values[:, None] * scaled[self.molecules], self.samples,
                                   self.num_samples) - offset[None, :]


def _peak_areas(graph, z: Array, molecules: Array) -> Array:
    stats = graph.meta.normalisation.get("contains_molecule", {}) if graph.meta.normalisation else {}
    if stats.get("transform") == "log1p" and "mean" in stats and "std" in stats:
        mean = jnp.asarray(np.asarray(stats["mean"], np.float32))
        std = jnp.asarray(np.asarray(stats["std"], np.float32))
        # Clipped: a new sample far above the training range must not overflow float32.
        return jnp.expm1(jnp.minimum(z * std[molecules] + mean[molecules], 60.0))
    return z - jnp.min(z) + 1.0 if z.shape[0] else z


def sample_profile(graph, edge_mask: Array | None = None, *, incoming: bool = False) -> SampleProfile:
    """The :class:`SampleProfile` of ``graph``'s samples.

    Args:
      graph: a ``HeteroGraph`` with ``contains_molecule`` edges (full graph or sampled subgraph).
      edge_mask: optional [E] bool over the edges read; False edges count as not detected.
      incoming: read the reverse relation (Molecule -> Sample, the edges a sample *receives*; the
        encoder's view, whose masks switch off what a sample sees) instead of the forward one.
    """
    key = schema.reverse_key(schema.CONTAINS) if incoming else schema.CONTAINS
    if key not in graph.edges:
        key = schema.CONTAINS
    edges = graph.edges[key]
    reverse = key != schema.CONTAINS
    samples = jnp.asarray(edges.receivers if reverse else edges.senders)
    molecules = jnp.asarray(edges.senders if reverse else edges.receivers)
    S, M = int(graph.num_nodes[schema.SAMPLE]), int(graph.num_nodes[schema.MOLECULE])
    z = jnp.asarray(edges.attributes, jnp.float32)[:, 0]
    real = padding_edge_masks(graph).get(key)
    real = jnp.ones(z.shape, bool) if real is None else jnp.asarray(real)
    area = jnp.maximum(_peak_areas(graph, z, molecules), 0.0)

    def values(on):
        a = jnp.where(on, area, 0.0)
        tic = jax.ops.segment_sum(a, samples, S)
        return jnp.where(on, jnp.log1p(TIC_SCALE * a / jnp.where(tic > 0, tic, 1.0)[samples]), 0.0)

    # Statistics: every real edge of the training samples (absent molecules count as 0).
    full = values(real)
    train = jnp.asarray(graph.sample_split) == SPLIT_CODES["train"]
    n_train = jnp.maximum(jnp.sum(train), 1).astype(jnp.float32)
    on_train = real & train[samples]
    mean = jax.ops.segment_sum(jnp.where(on_train, full, 0.0), molecules, M) / n_train
    second = jax.ops.segment_sum(jnp.where(on_train, full * full, 0.0), molecules, M) / n_train
    var = jnp.maximum(second - mean * mean, 0.0)
    # StandardScaler's rule: a constant molecule keeps scale 1.
    scale = jnp.where(var > 1e-10, jnp.sqrt(var), 1.0)
    on = real if edge_mask is None else real & jnp.asarray(edge_mask)
    return SampleProfile(values=values(on), samples=samples, molecules=molecules,
                         mean=jax.lax.stop_gradient(mean), scale=jax.lax.stop_gradient(scale),
                         num_samples=S, num_molecules=M)
