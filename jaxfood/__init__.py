"""jaxfood: heterogeneous graph attention networks for food metabolomics, in pure JAX.

Layers of the package (data flows one way):
``data`` (readers, simulator) -> ``graph`` (HeteroGraph) -> ``models`` (pure functions of params)
-> ``train`` (jit/pmap steps) -> ``eval`` (metrics, baselines, report).
"""

__version__ = "0.1.0"

from jaxfood.errors import UserError  # noqa: F401
