"""Out-of-library detection of ``jaxfood predict`` on the embedded data, as the README reports it.

    python benchmarks/bench_ool.py [--draws 3] [--held-out 5] [--workdir runs/bench_ool]

For each draw ``d`` (seed ``d``): ``--held-out`` foods of the embedded default data (the
simulator's tables, ``simulate(preset="default", seed=0)``) lose all their samples, every other
food 15 % of its samples; the model is fine-tuned on defaults on the rest
(:func:`jaxfood.workflows.out_of_library_rates`, from scratch, no GraphCL), and both groups of
left-out samples are predicted as new samples. Prints, per draw and every out-of-library score,
the detection rate (unknown-food samples flagged), the false-alarm rate (known-food samples
flagged; threshold: the default quantile of the validation scores) and the AUROC separating the
two groups; last, the default score's mean detection / false alarms / AUROC over the draws.
Takes ~3 minutes a draw on the 2-core development machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", type=int, default=3, help="draws of held-out foods (seeds 0..N-1) [default: 3]")
    parser.add_argument("--held-out", type=int, default=5, help="foods held out of training per draw [default: 5]")
    parser.add_argument("--workdir", default="runs/bench_ool", help="fine-tuning runs and results.json "
                        "[default: runs/bench_ool]")
    args = parser.parse_args(argv)
    if args.draws < 1 or args.held_out < 1:
        print(f"error: --draws {args.draws} / --held-out {args.held_out}: expected positive numbers", file=sys.stderr)
        return 2
    import numpy as np

    from jaxfood.data.simulate import simulate
    from jaxfood.eval.ool import DEFAULT_OOL_SCORE
    from jaxfood.train.finetune import FinetuneConfig
    from jaxfood.workflows import out_of_library_rates

    tables = simulate(preset="default", seed=0).tables
    workdir = Path(args.workdir)
    rows = []
    for draw in range(args.draws):
        rates = out_of_library_rates(tables, num_held_out=args.held_out, cfg=FinetuneConfig(),
                                     workdir=workdir / f"draw_{draw}", seed=draw)
        scores = {DEFAULT_OOL_SCORE: rates, **rates["alternative_scores"]}
        for name, r in scores.items():
            print(f"draw {draw} ({', '.join(rates['held_out_foods'])}): {name:12s} detection "
                  f"{r['detection_rate']:.3f}  false alarms {r['false_alarm_rate']:.3f}  AUROC {r['auroc']:.3f}  "
                  f"({rates['num_unknown_samples']} unknown, {rates['num_known_samples']} known samples)", flush=True)
        print(f"draw {draw}: known samples' top-1 accuracy {rates['known_test_accuracy']:.3f}", flush=True)
        rows.append({"draw": draw, "held_out_foods": rates["held_out_foods"],
                     "num_unknown_samples": rates["num_unknown_samples"],
                     "num_known_samples": rates["num_known_samples"],
                     "known_test_accuracy": rates["known_test_accuracy"],
                     "scores": {name: {k: r[k] for k in ("detection_rate", "false_alarm_rate", "auroc")}
                                for name, r in scores.items()}})
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "results.json").write_text(json.dumps(rows, indent=2))
    stats = ("detection_rate", "false_alarm_rate", "auroc")
    means = {name: {k: (float(np.mean(v := [r["scores"][name][k] for r in rows])), float(np.std(v))) for k in stats}
             for name in rows[0]["scores"]}
    for name, m in means.items():
        if name != DEFAULT_OOL_SCORE:
            print(f"{name}: " + ", ".join(f"{k} {mean:.3f} ± {std:.3f}" for k, (mean, std) in m.items()))
    d = means[DEFAULT_OOL_SCORE]
    print(f"{DEFAULT_OOL_SCORE} over {len(rows)} draws: detection {d['detection_rate'][0]:.3f} ± "
          f"{d['detection_rate'][1]:.3f}, false alarms {d['false_alarm_rate'][0]:.3f} ± {d['false_alarm_rate'][1]:.3f}, "
          f"AUROC {d['auroc'][0]:.3f} ± {d['auroc'][1]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
