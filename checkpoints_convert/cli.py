"""``python -m checkpoints_convert`` / ``jaxfood-convert``: PyTorch Geometric checkpoints <-> jaxfood.

Convert::

    python -m checkpoints_convert SRC.pt --out DIR [--mappings F --graph GRAPH_DIR] [--rename Old=New ...]
        [--allow-partial] [--verify] [--upstream-json F] [--to-torch OUT.pt]

writes an orbax checkpoint ``DIR/0`` (``params/encoder`` + ``meta`` with ``kind: converted`` and
the ``encoder_config``) that ``jaxfood finetune --pretrained DIR`` and ``jaxfood embed`` load,
plus ``DIR/conversion_report.json``. Export a jaxfood checkpoint back::

    python -m checkpoints_convert DIR --to-torch OUT.pt

Encoders in any jaxfood input mode export: node types not in mode ``embedding`` get the input
layers of :func:`checkpoints_convert.reference.build_reference_encoder` (``inputs.<T>`` Linear,
``shared.<T>``, ``profile.<T>``), which convert back to the same mode.

Exit status: 0 ok; 2 a bad input (one ``error:`` line naming the file, key and both shapes;
nothing written); 1 ``--verify`` above tolerance (nothing written) or an inexact round trip.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from jaxfood.errors import UserError

EPILOG = """\
examples:
  python -m checkpoints_convert pretrain_graphcl_encoder.pt --out converted/ --verify
  python -m checkpoints_convert linkpred_gat.pt --out converted/ --graph graph/ \\
      --mappings hetero_graph_mappings.json --allow-partial
  python -m checkpoints_convert pretrain_graphcl_encoder.pt --out converted/ \\
      --upstream-json intermediate_samples.json --to-torch back.pt
  python -m checkpoints_convert converted/ --to-torch back.pt

Accepted sources: the GraphCL checkpoint {"encoder_state", "config", "graph_path"}, a fine-tuned
model's state dict (encoder + heads: the heads are listed in the report as not converted), a
bare encoder state dict; keys with or without "module." (DistributedDataParallel) and in the
new (convs.<Src___rel___Dst>) or older (convs.Src__rel__Dst) PyG style. Files are read with
torch.load(weights_only=True); files whose unpickling would run code are refused.

Input modes: "embeddings.<T>.weight" (mode embedding, the original's); jaxfood's other modes as
"inputs.<T>.weight|bias" (features; with an embedding: both), "shared.<T>" (shared) and
"profile.<T>" (profile, Sample), the layout of checkpoints_convert/reference.py.

Default renames: Feature=Molecule, Sample|Contains|Feature=Sample|contains_molecule|Molecule,
Food|Contains|Nutrient=Food|has_nutrient|Nutrient, Is_of_type=is_instance_of (and rev_...).
"""


def _prog() -> str:
    """The name the user typed: the ``jaxfood-convert`` script or ``python -m checkpoints_convert``."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return name if name.startswith("jaxfood-convert") else "python -m checkpoints_convert"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=_prog(),
        description="Convert PyTorch Geometric HeteroGATEncoder checkpoints of the original PyTorch project\n"
                    "(GraphCL pretraining or fine-tuned link prediction) into jaxfood orbax checkpoints,\n"
                    "verify them against PyG, and export jaxfood encoders back to PyTorch.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SRC", help="a .pt file written by torch.save, or a jaxfood checkpoint "
                                                 "directory (with --to-torch only)")
    p.add_argument("--out", metavar="DIR", help="output checkpoint directory (must not exist or be empty)")
    p.add_argument("--graph", metavar="GRAPH_DIR", help="jaxfood graph (jaxfood build-graph) the encoder must "
                   "fit: relations, edge widths, node counts")
    p.add_argument("--mappings", metavar="F", help="the original hetero_graph_mappings.json (feature_ids, "
                   "food_names, nutrient_ids, sample_ids): reorder embedding rows to --graph's node order")
    p.add_argument("--rename", metavar="OLD=NEW", action="append", default=[],
                   help="translate a node type, relation name or whole relation 'Src|rel|Dst' of the original "
                        "(repeatable; overrides the default aliases)")
    p.add_argument("--allow-partial", action="store_true", help="convert what maps and report the rest "
                   "instead of failing (with --graph, what is missing is freshly initialised)")
    p.add_argument("--verify", action="store_true", help="rebuild the PyG encoder from the checkpoint, run both "
                   "on a random graph of matching shapes and print the max abs difference per node type "
                   "(exit 1 above 1e-5)")
    p.add_argument("--upstream-json", metavar="F", help="verify on the graph this intermediate JSON builds "
                   "(compatibility mode) instead of a random graph; implies --verify")
    p.add_argument("--to-torch", metavar="OUT.pt", help="also export the (converted) jaxfood encoder back to "
                   "the original state-dict layout (input modes other than 'embedding' as the input layers "
                   "of checkpoints_convert/reference.py); exact for an unchanged converted checkpoint")
    p.add_argument("--seed", type=int, default=0, help="seed of the random verification graph and of fresh "
                   "initialisations (--allow-partial)")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return p


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="convert", unit="step", file=sys.stderr, disable=None, leave=False)


def _fmt_diffs(result: dict) -> str:
    return ", ".join(f"{t} {v:.2e}" for t, v in result["max_abs_diff"].items())


def _export_directory(args) -> int:
    from checkpoints_convert.export import export_object, write_torch
    from jaxfood.train.checkpoint import load_encoder

    if args.out or args.verify or args.upstream_json or args.graph or args.mappings or args.rename:
        raise UserError(f"{args.source}: is a directory: only --to-torch applies to a jaxfood checkpoint "
                        "(convert options need a .pt source)")
    if not args.to_torch:
        raise UserError(f"{args.source}: is a directory; pass --to-torch OUT.pt to export it, or give a .pt "
                        "file to convert")
    cfg, params, meta = load_encoder(args.source)
    obj = export_object(params, cfg, meta.get("torch_source"), source=args.source)
    write_torch(obj, args.to_torch)
    layout = "its original layout" if meta.get("torch_source") else "the original project's default layout"
    print(f"exported {args.source} -> {args.to_torch} ({layout})")
    return 0


def run(args) -> int:
    from checkpoints_convert.load import require_torch

    require_torch()
    src = Path(args.source)
    if src.is_dir():
        return _export_directory(args)
    if not args.out:
        raise UserError("--out DIR is required to convert a .pt file")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: already exists and is not empty (choose a new --out directory)")
    if args.mappings and not args.graph:
        raise UserError("--mappings needs --graph GRAPH_DIR (the graph whose node order the rows are put in)")
    verify = args.verify or bool(args.upstream_json)
    if verify:
        from checkpoints_convert.load import require_pyg

        require_pyg()

    from checkpoints_convert.convert import convert_checkpoint
    from checkpoints_convert.load import load_checkpoint
    from checkpoints_convert.mapping import parse_renames

    renames = parse_renames(args.rename)
    bar = _progress(4 + bool(args.to_torch))
    ckpt = load_checkpoint(src)
    graph = mappings = upstream_graph = None
    if args.graph:
        from jaxfood.graph.hetero_graph import load_graph

        graph = load_graph(args.graph)
    if args.mappings:
        from jaxfood.data.upstream import read_upstream_mappings

        mappings = read_upstream_mappings(args.mappings)
    if args.upstream_json:
        from jaxfood.data.upstream import build_graph_from_upstream_json

        upstream_graph = build_graph_from_upstream_json(args.upstream_json)
    bar.update()
    conversion = convert_checkpoint(ckpt, renames=renames, allow_partial=args.allow_partial, graph=graph,
                                    mappings=mappings, mappings_source=args.mappings, seed=args.seed)
    report = conversion.report
    bar.update()

    lines = []
    arch = conversion.architecture
    counts = report["counts"]
    lines.append(f"converted {src} ({ckpt.format}): {counts['mapped']} tensors mapped, {counts['inert']} inert "
                 f"(edge_dim=0), {counts['skipped']} not converted")
    lines.append(f"architecture: {arch.num_layers} layers, {arch.num_heads} heads x {arch.head_channels} channels "
                 f"(hidden {arch.hidden_dim}), embedding {arch.embedding_dim}; nodes "
                 + ", ".join(f"{t} {n}" for t, n in arch.num_nodes.items()))
    other = {t: m for t, m in arch.input_modes.items() if m != "embedding"}
    if other:
        lines.append("input modes: " + ", ".join(f"{t} {m}" for t, m in other.items()))
    for key, why in list(report["skipped"].items())[:10]:
        lines.append(f"  not converted: {key}: {why}")
    if len(report["skipped"]) > 10:
        lines.append(f"  ... and {len(report['skipped']) - 10} more (see conversion_report.json)")
    for t, r in report["reordered"].items():
        lines.append(f"reordered {t}: {r['matched']} ids matched; {len(r['only_in_checkpoint'])} only in the "
                     f"checkpoint (dropped), {len(r['only_in_graph'])} only in the graph (new rows)")
    if report["initialised"]:
        lines.append(f"freshly initialised (not in the checkpoint): {len(report['initialised'])} parameters")

    status = 0
    if verify:
        from checkpoints_convert.verify import TOLERANCE, run_verify

        if report["initialised"] or report["problems"]:
            raise UserError(f"{src}: --verify needs a complete conversion ({len(report['problems'])} problem(s), "
                            f"{len(report['initialised'])} parameter(s) freshly initialised)")
        result = run_verify(conversion, ckpt, upstream_graph, seed=args.seed)
        report["verify"] = result
        lines.append(f"verify on {result['graph']}: max |jaxfood - PyG| per node type: {_fmt_diffs(result)} "
                     f"(tolerance {TOLERANCE:g}): {'passed' if result['passed'] else 'FAILED'}")
        if not result["passed"]:
            print("\n".join(lines))
            print(f"error: {src}: verification failed: the converted encoder differs from PyG by more than "
                  f"{TOLERANCE:g}; nothing written", file=sys.stderr)
            return 1
    bar.update()

    from jaxfood.io_utils import atomic_dir, write_json
    from jaxfood.train.checkpoint import save_checkpoint

    meta = {"kind": "converted", "encoder_config": conversion.encoder_config, "source": str(src),
            "architecture": arch.to_json(), "graph": args.graph, "torch_source": conversion.torch_source}
    with atomic_dir(out) as tmp:
        save_checkpoint(tmp, 0, {"params": {"encoder": conversion.params}}, meta)
        bar.update()
        if args.to_torch:
            from checkpoints_convert.export import compare_state_dicts, export_object, write_torch
            from checkpoints_convert.load import load_checkpoint as _load
            from jaxfood.train.checkpoint import load_encoder

            cfg, params, saved_meta = load_encoder(tmp)  # the round trip goes through orbax
            write_torch(export_object(params, cfg, saved_meta.get("torch_source"), source=str(out)), args.to_torch)
            back = _load(args.to_torch)
            originals = _source_encoder_state(ckpt, conversion)
            diffs = compare_state_dicts(originals, _as_tensors(back))
            report["round_trip"] = {"path": args.to_torch, "exact": not diffs, "tensors": len(originals),
                                    "differences": diffs[:20]}
            lines.append(f"exported -> {args.to_torch}: round trip "
                         + ("exact" if not diffs else f"NOT exact ({len(diffs)} difference(s): {diffs[0]})")
                         + f" over {len(originals)} encoder tensors")
            if diffs and not report["cast_to_float32"]:
                status = 1
            bar.update()
        write_json(tmp / "conversion_report.json", report)
    bar.close()
    lines.append(f"wrote {out}/ (orbax checkpoint, kind 'converted') and {out}/conversion_report.json")
    print("\n".join(lines))
    return status


def _source_encoder_state(ckpt, conversion) -> dict:
    """The source's encoder tensors (mapped + inert), in file order, as torch tensors."""
    from checkpoints_convert.load import numpy_to_tensor

    keep = set(conversion.report["mapped"]) | set(conversion.report["inert"])
    return {k: numpy_to_tensor(v, ckpt.dtypes[k]) for k, v in ckpt.state.items() if k in keep}


def _as_tensors(ckpt) -> dict:
    from checkpoints_convert.load import numpy_to_tensor

    return {k: numpy_to_tensor(v, ckpt.dtypes[k]) for k, v in ckpt.state.items()}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``jaxfood-convert`` and ``python -m checkpoints_convert``; returns the exit status."""
    from jaxfood.cli import run_command

    args = build_parser().parse_args(argv)
    return run_command(run, args, args.debug)


if __name__ == "__main__":
    sys.exit(main())
