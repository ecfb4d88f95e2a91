"""The README's demo table: PatchGD at full resolution vs full-image GD downsampled to fit.

    .venv/bin/python benchmarks/ultramnist_demo.py            # same as `make demo`
    .venv/bin/python benchmarks/ultramnist_demo.py --quick    # 1-minute smoke version

Writes benchmarks/results/demo/{results.md,results.json,results.png} and one run directory per
method (checkpoints, metrics.csv, training curves). Timings depend on the machine; accuracy
and peak memory (CPU tensor accounting) are reproducible from the seeds.
"""

from __future__ import annotations

import argparse
import logging

from gigapatch.demo import run_demo

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/demo")
    parser.add_argument("--data-dir", default="data/ultramnist-demo")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    run_demo(out_dir=args.out, data_dir=args.data_dir, quick=args.quick)
