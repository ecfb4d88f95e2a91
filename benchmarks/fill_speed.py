"""PatchGD's no-gradient fill from disk vs the bare encoder on the same patches in memory.

Writes one ``--side``² tiled TIFF with ``gigapatch data gigapixel`` (JPEG tiles by default,
as slides are; unless present), then, side by side in one run, encodes every patch of it:

- ``bare``: the encoder alone (``inference_mode``, the same chunks) on patches already in
  memory: the ceiling;
- ``fill, serial``: ``PatchGD.fill`` from the lazy TIFF with one reading thread and no
  read-ahead (what gigapatch did before issue 14);
- ``fill, overlapped``: ``PatchGD.fill`` with the thread-pool reads and the next chunk read
  while the current one is encoded (``LazyBatch.take``, ``read_ahead``).

Then, with ``--variants``, the overlapped fill again with ``model.channels_last`` and with
``model.compile`` (``torch.compile`` of the fill's encoder; the first, compiling pass is the
warm-up and is not timed): whether they help the no-gradient encoding on this machine.

Reports patches per second and the ratio of each fill to ``bare`` (issue 14's target ≥ 0.9:
reading hidden behind compute). Writes ``benchmarks/results/fill_speed.{json,md}``.

    python benchmarks/fill_speed.py --side 8192 --threads 2
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

import gigapatch.data.batch as batch_module
from gigapatch.config import Config
from gigapatch.data.batch import LazyBatch
from gigapatch.io.readers import open_image
from gigapatch.methods import create_method
from gigapatch.synth.gigapixel import generate_gigapixel

from bench_data import write_results  # benchmarks/: run as scripts

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results"


def _serial(read: Any, items: list[Any]) -> Iterator[tuple[Any, torch.Tensor]]:
    for item in items:
        yield item, read(item)


def _best(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--side", type=int, default=8192)
    p.add_argument("--patch", type=int, default=256)
    p.add_argument("--encoder", default="resnet18_layer2")
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="torch threads for the encoder")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compression", default="jpeg")
    p.add_argument("--data-dir", type=Path, default=ROOT / "data" / "fill-speed")
    p.add_argument("--variants", nargs="*", default=["channels_last", "compile"],
                   choices=["channels_last", "compile"],
                   help="also time the overlapped fill with these model options (none: skip)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    path = args.data_dir / "train" / "000000.tiff"
    meta = args.data_dir / "meta.json"
    if not (meta.is_file() and json.loads(meta.read_text()).get("side") == args.side
            and json.loads(meta.read_text()).get("compression") == args.compression):
        generate_gigapixel(args.data_dir, n_train=1, n_test=0, side=args.side,
                           compression=args.compression, progress=False)
    def make(option: str | None = None) -> Any:
        cfg = Config()
        cfg.data.in_chans, cfg.model.encoder, cfg.model.latent_dim = 1, args.encoder, 32
        cfg.method.patch_size, cfg.method.fill_chunk = args.patch, args.chunk
        if option is not None:
            setattr(cfg.model, option, True)
        torch.manual_seed(0)
        return create_method(cfg.validate()).eval()

    method = make()
    images = LazyBatch([open_image(path)])
    grid = method.grid(images)
    n = grid.num_patches
    with torch.inference_mode():
        patches = grid.taker(images)(torch.zeros(n, dtype=torch.long), torch.arange(n))

        def bare() -> None:
            for start in range(0, n, args.chunk):
                method.encode(patches[start : start + args.chunk])

        def fill() -> None:
            method.fill(images, grid)

        fill()  # warm-up: opens the file, first decode
        rows: dict[str, float] = {"bare": _best(bare, args.repeats)}
        threads, ahead = batch_module.IO_THREADS, batch_module.read_ahead
        batch_module.IO_THREADS, batch_module.read_ahead = 1, _serial  # read_chunks' helper
        rows["fill, serial"] = _best(fill, args.repeats)
        batch_module.IO_THREADS, batch_module.read_ahead = threads, ahead
        rows["fill, overlapped"] = _best(fill, args.repeats)
        for option in args.variants:
            variant = make(option)
            variant.fill(images, grid)  # warm-up (with compile: the compilation)
            rows[f"fill, overlapped, {option}"] = _best(
                lambda v=variant: v.fill(images, grid), args.repeats)
    rate = {k: n / v for k, v in rows.items()}
    md = [f"{n} patches of {args.patch}² from a {args.side}² {args.compression} TIFF, "
          f"{args.encoder}, chunks of {args.chunk}, {args.threads} torch threads, "
          f"{batch_module.IO_THREADS} reading threads:", "",
          "| pass | patches/s | ratio to bare encoder |", "|---|---|---|"]
    for k in rows:
        md.append(f"| {k} | {rate[k]:.0f} | {rate[k] / rate['bare']:.2f} |")
    write_results(OUT, "fill_speed", {"args": vars(args), "seconds": rows,
                                      "patches_per_second": rate, "patches": n}, md)


if __name__ == "__main__":
    main()
