"""``report.md``: one table per objective, the model beside each baseline, figures, config, runtime.

Input is the ``metrics.json`` dictionary (keys fixed by the issues that introduce them) plus the
figure paths; output is GitHub-flavoured Markdown with relative image links, readable without
anything else. Wherever the fine-tuned model is behind a baseline, the report says so plainly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: (section, key, label, baseline key in metrics["baselines"], higher is better)
OBJECTIVE_ROWS: dict[str, list[tuple[str, str, str | None, bool]]] = {
    "food_classification": [
        ("accuracy", "Accuracy", "logreg_accuracy", True),
        ("weighted_f1", "Weighted F1", "logreg_weighted_f1", True),
        ("auroc_macro", "Macro AUROC (one-vs-rest)", "logreg_auroc_macro", True),
        ("top3_accuracy", "Top-3 accuracy", "logreg_top3_accuracy", True),
        ("ece", "Expected calibration error", "logreg_ece", False),
    ],
    "nutrition": [
        ("knn_purity", "k-NN purity of Food embeddings (USDA category; held-out foods)", None, True),
        ("spearman", "Spearman: embedding vs nutrient distances (held-out foods)", None, True),
        ("knn_purity_in_sample", "k-NN purity of Food embeddings (in-sample: the triplet loss's foods)", None, True),
        ("spearman_in_sample", "Spearman: embedding vs nutrient distances (in-sample: the triplet loss's foods)",
         None, True),
        ("nutrient_r2", "R² of estimated nutrient profile", "ridge_nutrient_r2", True),
    ],
    "salient_molecules": [
        ("precision_at_10", "Precision@10 vs reference biomarkers", "fold_change_precision_at_10", True),
        ("recall_at_10", "Recall@10 vs reference biomarkers", None, True),
        ("fidelity_plus", "Fidelity+ (drop when top-10 removed)", None, True),
        ("fidelity_minus", "Fidelity− (drop when only top-10 kept)", None, False),
        ("stability_jaccard", "Stability under input perturbation (Jaccard of top-10 lists)", None, True),
        ("stability_jaccard_seeds", "Stability across seeds (Jaccard of top-10 lists)", None, True),
    ],
}

TITLES = {
    "food_classification": "Food classification (held-out samples)",
    "nutrition": "Nutrition alignment",
    "salient_molecules": "Salient molecule discovery",
}

BASELINE_NAMES = {
    "logreg_accuracy": "logistic regression",
    "logreg_weighted_f1": "logistic regression",
    "logreg_auroc_macro": "logistic regression",
    "logreg_top3_accuracy": "logistic regression",
    "logreg_ece": "logistic regression",
    "ridge_nutrient_r2": "ridge regression",
    "fold_change_precision_at_10": "fold change + PLS-DA VIP",
}


def _fmt(value: Any, std: Any = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, (int, float)):
        text = f"{value:.3f}"
        if isinstance(std, (int, float)) and not math.isnan(std):
            text += f" ± {std:.3f}"
        return text
    return str(value)


def _get(metrics: Mapping[str, Any], *path: str) -> Any:
    node: Any = metrics
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def _behind(model: Any, other: Any, higher_is_better: bool) -> bool:
    """Behind at the precision the report shows (3 decimals): figures that print the same are a tie,
    not a loss (0.7214 vs 0.7209 would read "0.721 is behind 0.721")."""
    if not isinstance(model, (int, float)) or not isinstance(other, (int, float)):
        return False
    model, other = round(float(model), 3), round(float(other), 3)
    return model < other if higher_is_better else model > other


def objective_table(metrics: Mapping[str, Any], section: str) -> tuple[str, list[str]]:
    """Markdown table for one objective and the plain sentences for where the model is behind."""
    std = metrics.get("seed_std", {})
    header = ("| Metric | jaxfood (fine-tuned) | pretrained encoder + probe | trained from scratch | "
              "untrained (initial weights) | baseline |")
    lines = [header, "|---|---|---|---|---|---|"]
    notes: list[str] = []
    for key, label, baseline_key, higher in OBJECTIVE_ROWS[section]:
        model = _get(metrics, section, key)
        probe = _get(metrics, "pretrained_probe", section, key)
        scratch = _get(metrics, "from_scratch", section, key)
        control = _get(metrics, "untrained", section, key)
        base = _get(metrics, "baselines", baseline_key) if baseline_key else None
        if all(v is None for v in (model, probe, scratch, base)):
            continue  # not measured in this run (e.g. stability across seeds with one seed)
        base_cell = (f"{_fmt(base, _get(std, 'baselines', baseline_key))} "
                     f"({BASELINE_NAMES.get(baseline_key, baseline_key)})" if base is not None else "–")
        arrow = "↑" if higher else "↓"
        lines.append(
            f"| {label} {arrow} | **{_fmt(model, _get(std, section, key))}** | "
            f"{_fmt(probe, _get(std, 'pretrained_probe', section, key))} | "
            f"{_fmt(scratch, _get(std, 'from_scratch', section, key))} | "
            f"{_fmt(control, _get(std, 'untrained', section, key))} | {base_cell} |"
        )
        if _behind(model, base, higher):
            notes.append(
                f"On {label.lower()}, jaxfood ({_fmt(model)}) is behind the "
                f"{BASELINE_NAMES.get(baseline_key, baseline_key)} baseline ({_fmt(base)})."
            )
        for name, other in (("the pretrained-only probe", probe), ("training from scratch", scratch)):
            if _behind(model, other, higher):
                notes.append(f"On {label.lower()}, fine-tuning ({_fmt(model)}) is behind {name} ({_fmt(other)}).")
    if section == "food_classification":
        rf = _get(metrics, "baselines", "rf_accuracy")
        if rf is not None:
            lines.append(f"| Accuracy, random forest baseline | | | | | {_fmt(rf, _get(std, 'baselines', 'rf_accuracy'))} |")
            if _behind(_get(metrics, section, "accuracy"), rf, True):
                notes.append(f"On accuracy, jaxfood is behind the random forest baseline ({_fmt(rf)}).")
    if section == "nutrition" and _get(metrics, section, "num_foods") is not None:
        lines.append(f"| Foods held out of the nutrition training (no nutrient input, no triplet) | "
                     f"{_get(metrics, section, 'num_foods')} | | | |")
    if section == "salient_molecules":
        headline_scorer = _get(metrics, section, "scorer")
        per_scorer = _get(metrics, section, "per_scorer") or {}
        for name, entry in per_scorer.items():
            if name != headline_scorer and isinstance(entry, Mapping) and "precision_at_10" in entry:
                lines.append(f"| Precision@10, {name} scorer | {_fmt(entry['precision_at_10'])} | | | | |")
        rnd = _get(metrics, "baselines", "random_precision_at_10")
        if rnd is not None:
            lines.append(f"| Precision@10, random ranking | | | | | {_fmt(rnd)} |")
        plus, minus = _get(metrics, section, "fidelity_plus"), _get(metrics, section, "fidelity_minus")
        if _behind(plus, minus, True):
            notes.append(f"Removing each sample's top-10 molecules changes the prediction less than keeping only them "
                         f"(fidelity+ {_fmt(plus)} < fidelity− {_fmt(minus)}): by this measure the importances "
                         "are not faithful.")
    return "\n".join(lines), notes


def render_report(
    metrics: Mapping[str, Any],
    figures: Mapping[str, str | Path] | None = None,
    config_yaml: str | None = None,
    workdir: str | Path | None = None,
    extra_sections: Sequence[tuple[str, str]] = (),
) -> str:
    """The Markdown text of ``report.md``. ``figures`` maps a caption to a path (made relative)."""
    workdir = Path(workdir) if workdir is not None else None
    parts = ["# jaxfood run report", ""]
    runtime = metrics.get("runtime_s")
    if runtime is not None:
        parts.append(f"Runtime: **{runtime:.1f} s** end to end.")
    seeds = metrics.get("seeds")
    if seeds:
        parts.append(f"Figures are the mean over {seeds} seeds (± standard deviation).")
    parts.append("")
    all_notes: list[str] = []
    for section in OBJECTIVE_ROWS:
        if section not in metrics:
            continue
        absent = _get(metrics, section, "absent")
        if absent:  # e.g. no nutrient table: say why instead of a table of dashes
            parts += [f"## {TITLES[section]}", "", f"Not measured: {absent}.", ""]
            continue
        table, notes = objective_table(metrics, section)
        parts += [f"## {TITLES[section]}", "", table, ""]
        if notes:
            parts += [f"- {n}" for n in notes] + [""]
        all_notes += notes
    weights = metrics.get("task_weights")
    if isinstance(weights, Mapping) and weights:
        parts += ["## Task weights at the end of fine-tuning", "", "| Task | Weight |", "|---|---|"]
        parts += [f"| {k} | {_fmt(v)} |" for k, v in weights.items()]
        parts.append("")
    parts += ["## Verdict", ""]
    if all_notes:
        parts.append(f"The model is behind a comparison in {len(all_notes)} place(s); see the notes under each table.")
    else:
        parts.append("The fine-tuned model is at least as good as every baseline and ablation reported above.")
    parts.append("")
    for title, body in extra_sections:
        parts += [f"## {title}", "", body, ""]
    if figures:
        parts += ["## Figures", ""]
        for caption, path in figures.items():
            rel = Path(path)
            if workdir is not None:
                try:
                    rel = Path(path).resolve().relative_to(workdir.resolve())
                except ValueError:
                    rel = Path(path)
            parts += [f"### {caption}", "", f"![{caption}]({rel.as_posix()})", ""]
    if config_yaml:
        parts += ["## Configuration", "", "```yaml", config_yaml.rstrip(), "```", ""]
    return "\n".join(parts)
