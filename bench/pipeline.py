"""Benchmark the extraction pipeline: the model's idle wait on the loader, and peak memory.

For each ``--images`` count, a fresh subprocess creates a store, a random ImageGPT checkpoint
and a feature set of that many digits images, and runs `workers.extract.extract_blocks` over
every block. It prints the pipeline's summary log line (loader wait, writer queue wait, writer
idle and write seconds) and the process's peak resident memory from ``resource.getrusage``.
The digits split is loaded whole in every run, so a growth of peak memory with the image count
comes from the pipeline, not from the dataset.

Example::

    python -m bench.pipeline --images 256 1024 --layers 4 --width 128 --size 16
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# A direct run (python bench/pipeline.py) puts bench/ first on sys.path, where bench/store.py
# would shadow the store package that child() imports, so the repository root goes before it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--layers", type=int, default=4, help="n_layer of the random model")
    parser.add_argument("--width", type=int, default=128, help="n_embd of the random model")
    parser.add_argument("--size", type=int, default=16, help="image side; seq = size**2")
    parser.add_argument("--batch", type=int, default=32, help="images per forward pass")
    parser.add_argument("--block-rows", type=int, default=256, help="rows per block")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def child(args: argparse.Namespace, n_images: int) -> dict[str, object]:
    """Run one extraction in this process and return its timings and peak memory."""
    import torch

    torch.set_num_threads(args.threads)
    from store import Store
    from store.featureset import create_featureset
    from store.settings import Settings
    from store.spec import FeatureSetSpec
    from tests.factories import tiny_imagegpt
    from workers.datasets import load_split
    from workers.extract import extract_blocks
    from workers.modelref import processor_spec, resolve_model

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logging.getLogger("workers.extract").addHandler(Keep())
    logging.getLogger("workers.extract").setLevel(logging.INFO)

    root = Path(tempfile.mkdtemp(prefix="layerbank-bench-pipeline-"))
    model_path = tiny_imagegpt(
        root / "models" / "igpt", n_layer=args.layers, n_embd=args.width, n_head=4, size=args.size
    )
    ref = resolve_model(str(model_path), models_dir=None, allow_hub=False)
    split = load_split("digits", "train", limit=n_images, seed=0)
    spec = FeatureSetSpec(
        model=str(model_path),
        model_revision=ref.revision,
        model_family=ref.family,
        processor=processor_spec(ref, "plain"),
        dataset="digits",
        dataset_fingerprint=split.fingerprint,
        split="train",
        limit=n_images,
        seed=0,
        layers=list(range(args.layers + 1)),
        pooling="mean",
    )
    store = Store(root / "store")
    featureset = create_featureset(
        store,
        spec,
        layer_map=ref.layer_map(spec.layers, spec.pooling),
        dim=ref.dim,
        labels=split.labels,
        item_ids=split.item_ids,
        class_names=split.class_names,
        block_rows=args.block_rows,
    )
    settings = Settings(
        store=str(root / "store"), device="cpu", allow_hub=False, model_roots=[model_path.parent]
    )
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    extract_blocks(
        store,
        featureset.id,
        list(range(featureset.n_blocks)),
        settings=settings,
        batch_size=args.batch,
    )
    seconds = time.perf_counter() - started
    return {
        "images": n_images,
        "blocks": featureset.n_blocks,
        "seconds": seconds,
        "summary": records[-1],
        "peak_rss_mib_before": rss_before / 1024,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    args = parse_args()
    if args.child:
        print(json.dumps(child(args, args.images[0])))
        return
    print(
        f"load {os.getloadavg()}, model n_layer {args.layers} width {args.width} "
        f"seq {args.size**2}, batch {args.batch}, block rows {args.block_rows}, "
        f"{args.threads} torch thread(s)"
    )
    for n_images in args.images:
        command = [
            sys.executable,
            "-m",
            "bench.pipeline",
            "--child",
            "--images",
            str(n_images),
            *(
                f"--{k.replace('_', '-')}={v}"
                for k, v in vars(args).items()
                if k not in ("images", "child")
            ),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        output = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
        result = json.loads(output.stdout.strip().splitlines()[-1])
        print(
            f"\n{result['images']} images, {result['blocks']} blocks, "
            f"{result['images'] / result['seconds']:.1f} images/s"
        )
        print(f"  {result['summary']}")
        print(
            f"  peak RSS {result['peak_rss_mib']:.0f} MiB "
            f"({result['peak_rss_mib_before']:.0f} MiB before extraction)"
        )
    print(f"\nload at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
