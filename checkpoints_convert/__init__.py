"""PyTorch Geometric -> Flax/orbax weight conversion for jaxfood (and back).

``python -m checkpoints_convert SRC.pt --out DIR`` (also installed as ``jaxfood-convert``); see
:mod:`checkpoints_convert.cli`. Library entry points:

* :func:`checkpoints_convert.load.load_checkpoint` -- safe ``torch.load(weights_only=True)``;
* :func:`checkpoints_convert.convert.convert_checkpoint` -- state dict -> jaxfood encoder params
  + ``conversion_report.json`` content;
* :func:`checkpoints_convert.export.export_object` -- jaxfood encoder -> original state dict;
* :func:`checkpoints_convert.verify.run_verify` -- PyG vs jaxfood on the same graph.

torch and torch_geometric are optional dependencies (``pip install "jaxfood[convert]"``); they are
imported only when needed.
"""
