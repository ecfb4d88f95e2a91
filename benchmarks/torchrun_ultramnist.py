"""The README's torchrun figures: one epoch of PatchGD on UltraMNIST with 2 processes.

    .venv/bin/python benchmarks/torchrun_ultramnist.py      # ~1 min (+ data generation once)

Generates ``data/ultramnist`` (1,000 + 200 images of 512², the generator's defaults) if it is
missing, runs ``torchrun --standalone --nproc_per_node=2 -m gigapatch train --config
configs/ultramnist_patchgd.yaml --set train.epochs=1`` and prints the run's training time,
throughput, peak step memory and ``world_size`` from its ``summary.json``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "ultramnist"
NAME = "torchrun_ultramnist"


def main() -> None:
    if not (DATA / "train.csv").is_file():
        subprocess.run([sys.executable, "-m", "gigapatch", "data", "ultramnist", "--out",
                        str(DATA), "--quiet"], check=True, cwd=ROOT)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node=2", "-m", "gigapatch", "train", "--config",
                    "configs/ultramnist_patchgd.yaml", "--set", "train.epochs=1",
                    "--set", "train.progress=false", "--name", NAME, "--overwrite"],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    s = json.loads((ROOT / "runs" / NAME / "summary.json").read_text())
    print(f"world_size {s['world_size']}: one epoch in {s['train_seconds']:.0f} s, "
          f"{s['images_per_second']:.0f} images/s over both processes, peak step memory "
          f"{s['peak_memory']} per process")


if __name__ == "__main__":
    main()
