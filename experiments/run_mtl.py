#!/usr/bin/env python
"""The main job: graph -> GraphCL pretraining -> three-task fine-tuning -> evaluation -> report.

    python experiments/run_mtl.py [--workdir W] [--graph GRAPH_DIR] [--config F] [--set key=value ...]

Without ``--graph`` it builds the embedded default graph (simulated samples with real USDA
nutrients) and saves it in ``W/graph/``. Writes ``W/metrics.json``, ``W/checkpoints/`` (orbax, the
fine-tuned model), ``W/tb/`` (TensorBoard), ``W/pretrain/`` (GraphCL outputs), ``W/ablations/``
(pretrained-only probe, from scratch; ``untrained``: the same model with its initial weights), ``W/figures/``, ``W/rankings.json`` (each scorer's top-k
molecules of every food) and ``W/report.md``, then prints a summary.
Configuration keys: ``seed``, ``seeds``, ``pretrain.*``, ``finetune.*``, ``evaluation.*`` (see
``W/run_config.yaml`` after a run for every key and its value).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxfood.cli import run_command  # noqa: E402
from jaxfood.errors import ConfigError  # noqa: E402
from jaxfood.train.finetune import FinetuneConfig  # noqa: E402
from jaxfood.train.graphcl import PretrainConfig  # noqa: E402
from jaxfood.train.parallel_options import add_data_parallel_arguments  # noqa: E402


@dataclasses.dataclass(frozen=True)
class EvaluationConfig:
    #: Train the pretrained-only probe (frozen encoder) and the from-scratch model as well.
    ablations: bool = True
    #: Fit the logistic regression, random forest, ridge and fold-change baselines.
    baselines: bool = True
    rf_estimators: int = 200
    #: k of precision@k / recall@k / fidelity.
    top_k: int = 10


@dataclasses.dataclass(frozen=True)
class RunConfig:
    seed: int = 0
    #: Repeat pretraining, fine-tuning and evaluation over this many seeds (seed, seed+1, ...).
    seeds: int = 1
    pretrain: PretrainConfig = dataclasses.field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)
    evaluation: EvaluationConfig = dataclasses.field(default_factory=EvaluationConfig)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one to show (not '(default: None)')."""

    def _get_help_string(self, action):
        if action.default in (None, False, []) or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="run_mtl.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--workdir", default="runs/mtl", help="output directory (created; files in it are replaced)")
    parser.add_argument("--graph", default=None, help="graph directory from 'jaxfood build-graph' (default: embedded)")
    parser.add_argument("--config", default=None, help="YAML file of RunConfig keys")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set finetune.steps=200 (repeatable)")
    parser.add_argument("--seeds", type=int, default=None, help="shortcut for --set seeds=N")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument("--no-compile-cache", action="store_true", help="do not keep compiled programs on disk")
    add_data_parallel_arguments(parser)  # --coordinator/--num-processes/--process-id, --sampled, ...
    return parser.parse_args(argv)


def _in_section(err: Exception, section: str) -> ConfigError:
    """A section's check message with its key dotted under ``section`` (``epochs`` -> ``pretrain.epochs``)."""
    msg = str(err)
    for source, inner in ((f"{section} config 'encoder': ", "encoder."), (f"{section} config: encoder: ", "encoder."),
                          (f"{section} config: ", "")):
        if msg.startswith(source):
            rest = re.sub(r"^(keys? )'", rf"\1'{section}.{inner}", msg[len(source):])
            return ConfigError(f"config: {rest}")
    bare = re.match(r"^([A-Za-z_][\w.]*)( =|:| and )", msg)  # "epochs = -1: ..." (pretrain's checks)
    if bare:
        return ConfigError(f"config: key '{section}.{bare.group(1)}'{msg[bare.end(1):]}")
    return ConfigError(f"config: {section}: {msg}")


def check_run_config(cfg: RunConfig, graph=None) -> RunConfig:
    """Checks every key of the run before anything runs or is written; errors name the dotted key.

    With ``graph`` also the keys that depend on it (pretraining augmentations of input features).
    """
    from jaxfood.train.adapt import adapt_to_graph
    from jaxfood.train.finetune import check_config as check_finetune_config
    from jaxfood.train.graphcl import check_pretrain_config

    if cfg.seeds < 1:
        raise ConfigError(f"--set seeds={cfg.seeds}: expected a positive number of seeds")
    for key in ("rf_estimators", "top_k"):
        value = getattr(cfg.evaluation, key)
        if value < 1:
            raise ConfigError(f"config: key 'evaluation.{key}' = {value}: expected a positive integer")
    default = FinetuneConfig() if graph is None else adapt_to_graph(FinetuneConfig(), graph)[0]  # as run() adapts it
    if cfg.finetune.encoder != default.encoder:
        # Fine-tuning starts from the pretrained encoder and the from-scratch ablation copies
        # pretrain.encoder, so finetune.encoder would be silently ignored here.
        raise ConfigError("config: key 'finetune.encoder' has no effect in run_mtl.py (the fine-tuned model "
                          "keeps the pretrained encoder): set pretrain.encoder.* instead")
    try:
        check_finetune_config(cfg.finetune)
    except ConfigError as err:
        raise _in_section(err, "finetune") from None
    if graph is not None:
        try:
            check_pretrain_config(cfg.pretrain, graph)
        except ConfigError as err:
            raise _in_section(err, "pretrain") from None
    return cfg


def _seeded(cfg: RunConfig, seed: int) -> RunConfig:
    return dataclasses.replace(
        cfg, seed=seed,
        pretrain=dataclasses.replace(cfg.pretrain, seed=seed),
        finetune=dataclasses.replace(cfg.finetune, seed=seed),
    )


def run_once(graph, cfg: RunConfig, workdir: Path, reference, progress: bool, log, options=None) -> dict:
    """One seed: pretrain, fine-tune, ablations; returns metrics (without baselines) and outputs."""
    from functools import partial

    from jaxfood import workflows
    from jaxfood.eval.pipeline import headline

    # The same workflows as the `jaxfood` commands, on every device of every process.
    pretrain = partial(workflows.pretrain, options=options)
    finetune = partial(workflows.finetune, options=options)

    log(f"[seed {cfg.seed}] GraphCL pretraining")
    pre = pretrain(graph, cfg.pretrain, workdir / "pretrain", progress=progress)
    log(f"[seed {cfg.seed}] fine-tuning three tasks")
    ft = finetune(graph, cfg.finetune, workdir, pretrained=pre.checkpoint_dir, biomarkers=reference, progress=progress)
    metrics = dict(ft.metrics)
    outputs = {"pretrain": pre, "finetune": ft}
    if cfg.evaluation.ablations:
        steps = cfg.finetune.steps
        # The ablations are controls: their metrics go in metrics.json, no TensorBoard log or curves;
        # they are evaluated with the scorers fine-tuning used (fitted to the memory on large graphs).
        fitted = dict(salient_scorer=ft.config.salient_scorer, scorers=ft.config.scorers)
        probe_cfg = dataclasses.replace(
            cfg.finetune, tensorboard=False, figures=False, **fitted,
            optimizer=dataclasses.replace(cfg.finetune.optimizer, freeze_encoder_steps=steps))
        log(f"[seed {cfg.seed}] ablation: pretrained encoder, frozen, heads only")
        probe = finetune(graph, probe_cfg, workdir / "ablations" / "pretrained_probe", pretrained=pre.checkpoint_dir,
                         biomarkers=reference, progress=progress)
        scratch_cfg = dataclasses.replace(cfg.finetune, encoder=cfg.pretrain.encoder, tensorboard=False, figures=False,
                                          **fitted)
        log(f"[seed {cfg.seed}] ablation: same model trained from scratch")
        scratch = finetune(graph, scratch_cfg, workdir / "ablations" / "from_scratch", pretrained=None,
                           biomarkers=reference, progress=progress)
        metrics["pretrained_probe"] = headline(probe.metrics)
        metrics["from_scratch"] = headline(scratch.metrics)
        log(f"[seed {cfg.seed}] control: the same model with its initial weights (untrained)")
        metrics["untrained"] = headline(workflows.untrained(graph, scratch_cfg, biomarkers=reference))
    metrics["pretraining"] = pre.metrics
    return {"metrics": metrics, "outputs": outputs}


def summary_table(metrics: dict) -> str:
    rows = [
        ("food accuracy", ("food_classification", "accuracy"), ("baselines", "logreg_accuracy")),
        ("food weighted F1", ("food_classification", "weighted_f1"), ("baselines", "logreg_weighted_f1")),
        ("food AUROC (macro)", ("food_classification", "auroc_macro"), None),
        ("food top-3 accuracy", ("food_classification", "top3_accuracy"), None),
        ("Food k-NN purity (held out)", ("nutrition", "knn_purity"), None),
        ("nutrient Spearman (held out)", ("nutrition", "spearman"), None),
        ("nutrient R²", ("nutrition", "nutrient_r2"), ("baselines", "ridge_nutrient_r2")),
        ("biomarker precision@10", ("salient_molecules", "precision_at_10"),
         ("baselines", "fold_change_precision_at_10")),
        ("fidelity+", ("salient_molecules", "fidelity_plus"), None),
        ("fidelity-", ("salient_molecules", "fidelity_minus"), None),
    ]

    def get(path):
        node = metrics
        for key in path or ():
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return node

    def fmt(x):
        return f"{x:8.3f}" if isinstance(x, (int, float)) else f"{'–':>8}"

    lines = [f"{'metric':<26}{'jaxfood':>9}{'baseline':>10}", "-" * 45]
    for label, model, base in rows:
        lines.append(f"{label:<26}{fmt(get(model)):>9}{fmt(get(base)):>10}")
    lines.append(f"{'runtime (s)':<26}{fmt(metrics.get('runtime_s')):>9}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    from jaxfood.train.processes import init_from_args, is_primary

    init_from_args(args)  # joins a multi-host job before anything touches a device
    from jaxfood.train.parallel_options import options_from_args
    from jaxfood.train.preemption import PREEMPTED_EXIT, Preempted

    options = options_from_args(args)
    from jaxfood.config import dump_config, load_config
    from jaxfood.data.default import build_default_graph
    from jaxfood.eval.evaluator import default_biomarkers
    from jaxfood.eval.pipeline import (
        SECTIONS,
        food_rankings,
        mean_and_std,
        rankings_with_details,
        report_assets,
        run_baselines,
        scorer_rankings,
        seed_stability,
    )
    from jaxfood.eval.report import render_report
    from jaxfood.graph.hetero_graph import load_graph, save_graph
    from jaxfood.graph.splits import resplit
    from jaxfood.io_utils import check_output_dir, write_json, write_text
    from jaxfood.train.adapt import adapt_and_report

    overrides = list(args.set) + ([f"seeds={args.seeds}"] if args.seeds is not None else [])
    cfg = check_run_config(load_config(RunConfig(), args.config, overrides))
    workdir = check_output_dir(args.workdir, "--workdir")
    progress = not args.no_progress

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {msg}", flush=True)

    # Inputs are read and checked before anything is written: a bad graph leaves no workdir behind.
    graph = load_graph(args.graph) if args.graph else build_default_graph(seed=cfg.seed)
    cfg = adapt_and_report(cfg, graph, log)  # defaults follow the graph (no nutrients, no Molecule features...)
    check_run_config(cfg, graph)
    workdir.mkdir(parents=True, exist_ok=True)
    if is_primary():
        write_text(workdir / "run_config.yaml", dump_config(cfg))
    if args.graph:
        log(f"graph from {args.graph}")
    else:
        if is_primary():
            save_graph(graph, workdir / "graph")
        log(f"embedded default graph built, saved in {workdir / 'graph'}")
    reference = default_biomarkers(graph)

    runs = []
    for i in range(cfg.seeds):
        seed_cfg = _seeded(cfg, cfg.seed + i)
        seed_dir = workdir if i == 0 else workdir / "seeds" / str(seed_cfg.seed)
        # Seeds vary the split too (seed_std then includes split variance); the baselines follow it.
        seed_graph = graph if i == 0 else resplit(graph, seed_cfg.seed)
        if i > 0 and is_primary():
            save_graph(seed_graph, seed_dir / "graph")
        try:
            run = run_once(seed_graph, seed_cfg, seed_dir, reference, progress, log, options)
        except Preempted as err:
            print(err, flush=True)
            return PREEMPTED_EXIT
        if cfg.evaluation.baselines and is_primary():
            log(f"[seed {seed_cfg.seed}] baselines: logistic regression, random forest, ridge, fold change + PLS-DA "
                "VIP, random")
            run["metrics"]["baselines"] = run_baselines(seed_graph, reference, k=cfg.evaluation.top_k,
                                                        seed=seed_cfg.seed, rf_estimators=cfg.evaluation.rf_estimators)
        runs.append({**run, "graph": seed_graph})
    if not is_primary():
        return 0  # process 0 alone runs the baselines and writes metrics.json and report.md
    first = runs[0]
    metrics = dict(first["metrics"])
    if cfg.seeds > 1:
        mean, std = mean_and_std([r["metrics"] for r in runs])
        metrics.update({k: v for k, v in mean.items() if k in ("food_classification", "nutrition",
                                                                 "salient_molecules", "pretrained_probe",
                                                                 "from_scratch", "untrained", "baselines")})
        metrics["seed_std"] = std
        metrics["seeds"] = cfg.seeds
        k = cfg.evaluation.top_k
        rankings = [food_rankings(r["outputs"]["finetune"], r["graph"], k=k) for r in runs]
        metrics["salient_molecules"] = {**metrics["salient_molecules"],
                                        "stability_jaccard_seeds": seed_stability(rankings, k)}
    log("report: confusion matrix, Food embedding maps, top molecules, model vs baselines, per-food table")
    assets = report_assets(first["outputs"]["finetune"], graph, workdir, metrics, reference, k=cfg.evaluation.top_k)
    metrics["runtime_s"] = time.perf_counter() - start
    # The three objectives first, with their detail (per nutrient, per scorer), then the rest.
    ordered = {**{k: metrics[k] for k in SECTIONS if k in metrics},
               **{k: v for k, v in metrics.items() if k not in SECTIONS}}
    write_json(workdir / "metrics.json", ordered)
    rankings = scorer_rankings(first["outputs"]["finetune"], graph, k=cfg.evaluation.top_k,
                               scorers=first["outputs"]["finetune"].config.scorers)
    write_json(workdir / "rankings.json", rankings_with_details(rankings, graph))  # ids with m/z, RT, annotation
    figures = dict(first["outputs"]["finetune"].figures)
    figures.update(assets.figures)
    figures.update({f"pretraining: {k}": v for k, v in first["outputs"]["pretrain"].figures.items()})
    write_text(workdir / "report.md", render_report(ordered, figures, dump_config(cfg), workdir=workdir,
                                                    extra_sections=assets.sections))
    log(f"wrote {workdir / 'metrics.json'} and {workdir / 'report.md'}")
    print(summary_table(ordered))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command(run, args, args.debug)


if __name__ == "__main__":
    sys.exit(main())
