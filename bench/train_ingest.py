"""Training ingestion at scale: what one train worker reads and holds, before and after streaming
training ingestion (issue #20 item 2), on synthetic pairs tables of 100k and 500k rows.

Every measurement runs in a fresh Python process, so its peak RSS is its own:

- ``driver``: the train driver's one read: ``read_pairs`` (schema check, canonical order), the
  selection bookkeeping, and ``write_training_data`` (the training copy workers read);
- ``whole``: the baseline, what every worker did before: read the whole pairs table, sort it
  canonically, take the kept rows and hold every column the loop uses as Python lists;
- ``share W``: what a worker does now with W workers: ``PairShare.load`` of its rows of one epoch
  (``epoch_share``) from the training copy;
- ``reference driver``, before and now: the reference pass's driver-side checks, once
  ``read_pairs`` + ``check_images_exist`` over the whole table (the driver then held every pair
  while the scorers ran), now ``pair_files`` (footers) + ``check_pair_columns`` (image, id and
  strategy columns, file by file).

It prints per-worker peak RSS above the interpreter's baseline (the same imports, no data), the
wall time, and the ratios against ``whole``. No model is involved (``select_pairs``' prompt
lengths need the processor; the driver run uses the kept-everything selection the benchmark
controls), so the numbers are the data path's alone.

    .venv/bin/python bench/train_ingest.py [--sizes 100000,500000] [--workers 1,2,8] [--work /tmp/bpo-train-ingest]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORDS = ("a red cup sits on the wooden table beside a small blue plate and a fork while the light "
         "falls from the window onto the floor near the green chair").split()


def peak_mb() -> float:
    """This process's peak RSS (``VmHWM``: unlike ``ru_maxrss``, not inherited across fork + exec
    from the parent that wrote the sources)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def _text(i: int, n_words: int) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n_words))


def write_source(n: int, work: str) -> str:
    """``work/pairs-N/pairs/part-*.parquet``: N pairs of detailed-caption size (prompt ~10
    words, answers ~60 words), in 4 files, rows not in canonical order."""
    import pyarrow.parquet as pq

    from bpo_ray.schemas import pairs_table

    out = os.path.join(work, f"pairs-{n}")
    if os.path.exists(os.path.join(out, "done")):
        return out
    image = os.path.join(work, "bench.png")
    if not os.path.exists(image):
        from PIL import Image

        os.makedirs(work, exist_ok=True)
        Image.new("RGB", (32, 32), (200, 40, 40)).save(image)
    os.makedirs(os.path.join(out, "pairs"), exist_ok=True)
    per_file = -(-n // 4)
    for f in range(4):
        rows = [{
            "id": f"pair-{i:08d}", "source": "bench", "source_id": f"rec-{(i * 7919) % n:08d}",
            "image": image, "image_sha256": "", "prompt": "Describe the image. " + _text(i, 8),
            "chosen": _text(i, 60), "rejected": _text(i + 1, 60), "strategy": "error_injection", "noise_step": None,
            "generator": "bench", "sampling": "{}", "seed": 0, "ref_chosen_logp": -float(i % 97),
            "ref_rejected_logp": -float(i % 89) - 1,
        } for i in range(f * per_file, min(n, (f + 1) * per_file))]
        pq.write_table(pairs_table(rows), os.path.join(out, "pairs", f"part-{f}.parquet"))
    Path(out, "done").write_text("")
    return out


def run_driver(pairs: str, out: str) -> dict:
    from bpo_ray.train.data import PreparedPairs, read_pairs, write_training_data

    t0 = time.perf_counter()
    table = read_pairs(pairs)
    prepared = PreparedPairs(uri=pairs, num_pairs=table.num_rows, keep=list(range(table.num_rows)))
    data = write_training_data(table, prepared, out)
    return {"rows": data.train_rows, "wall_s": time.perf_counter() - t0}


def run_whole(pairs: str, _out: str) -> dict:
    from bpo_ray.train.data import read_pairs

    t0 = time.perf_counter()
    table = read_pairs(pairs)
    table = table.take(list(range(table.num_rows)))
    held = {c: table.column(c).to_pylist() for c in ("id", "image", "image_sha256", "prompt", "chosen", "rejected",
                                                     "ref_chosen_logp", "ref_rejected_logp")}
    return {"rows": len(held["id"]), "wall_s": time.perf_counter() - t0}


def run_share(out: str, world: int) -> dict:
    from bpo_ray.train.data import TRAIN_DATA_DIR, DataPosition, PairShare, epoch_share, parquet_rows

    t0 = time.perf_counter()
    uri = os.path.join(out, TRAIN_DATA_DIR, "train.parquet")
    n = parquet_rows(uri)
    share = PairShare(uri, n, processor=None, max_length=0)
    _, rows = epoch_share(DataPosition(), n, 8 * world, seed=0, rank=0, micro=8)
    share.load(rows)
    return {"rows": len(share.loaded), "wall_s": time.perf_counter() - t0, "row_groups_read": share.row_groups_read}


def run_reference_driver_before(pairs: str, _out: str) -> dict:
    from bpo_ray.train.data import check_images_exist, read_pairs

    t0 = time.perf_counter()
    table = read_pairs(pairs, canonical=False)
    check_images_exist(table)
    return {"rows": table.num_rows, "wall_s": time.perf_counter() - t0}


def run_reference_driver_now(pairs: str, _out: str) -> dict:
    from bpo_ray.train.data import pairs_location
    from bpo_ray.train.reference import check_pair_columns, pair_files

    t0 = time.perf_counter()
    files = pair_files(pairs_location(pairs))
    check_pair_columns(files)
    return {"rows": 0, "wall_s": time.perf_counter() - t0}


def child(args: argparse.Namespace) -> None:
    import pyarrow  # noqa: F401  (the baseline holds the same imports)

    import bpo_ray.train.data  # noqa: F401

    base = peak_mb()
    if args.child == "baseline":
        result = {"rows": 0, "wall_s": 0.0}
    elif args.child == "driver":
        result = run_driver(args.pairs, args.out)
    elif args.child == "whole":
        result = run_whole(args.pairs, args.out)
    elif args.child == "ref_before":
        result = run_reference_driver_before(args.pairs, args.out)
    elif args.child == "ref_now":
        result = run_reference_driver_now(args.pairs, args.out)
    else:
        result = run_share(args.out, int(args.child.split(":")[1]))
    print(json.dumps({**result, "peak_mb": peak_mb(), "import_peak_mb": base}))


def measure(what: str, pairs: str, out: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", what, "--pairs", pairs, "--out", out],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,500000")
    ap.add_argument("--workers", default="1,2,8")
    ap.add_argument("--work", default="/tmp/bpo-train-ingest")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--pairs", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    print(f"load average before: {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        pairs = write_source(n, args.work)
        out = os.path.join(args.work, f"train-{n}")
        base = measure("baseline", pairs, out)["peak_mb"]
        results = {"driver": measure("driver", pairs, out), "whole": measure("whole", pairs, out)}
        for w in (int(x) for x in args.workers.split(",")):
            results[f"share:{w}"] = measure(f"share:{w}", pairs, out)
        results["ref_before"] = measure("ref_before", pairs, out)
        results["ref_now"] = measure("ref_now", pairs, out)
        whole = results["whole"]
        for name, r in results.items():
            if name == "ref_now":  # against the reference driver before
                whole = results["ref_before"]
            held = r["peak_mb"] - base
            rows.append((n, name, r["rows"], r["wall_s"], held, held / (whole["peak_mb"] - base),
                         r["wall_s"] / whole["wall_s"]))
    print(f"load average after: {os.getloadavg()[0]:.1f}\n")
    print("| pairs | process | rows held | wall s | peak RSS above imports, MB | RSS / whole | wall / whole |")
    print("|---|---|---|---|---|---|---|")
    for n, name, held_rows, wall, mb, r_mb, r_wall in rows:
        label = {"driver": "driver (read + write copy)", "whole": "worker before: whole table",
                 "ref_before": "reference driver before: whole table",
                 "ref_now": "reference driver now: footers + 3 columns (ratios vs the line above)"}.get(
            name, f"worker now, {name.split(':')[-1]} workers: its share")
        print(f"| {n:,} | {label} | {held_rows:,} | {wall:.2f} | {mb:.0f} | x{r_mb:.2f} | x{r_wall:.2f} |")


if __name__ == "__main__":
    main()
