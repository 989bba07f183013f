"""Measure the peak memory of one adapter fit and compare it with the API's estimate.

Builds a tiny random ImageGPT (cached under --models), fits adapters on digits for one epoch
on one CPU thread, and prints the growth of the process's peak RSS during the fit next to
`workers.probes.settings.adapter_fit_bytes` for the same sizes. The estimate is meant to stay
above the measurement. Run by hand, never in CI:

    .venv/bin/python bench/adapter_memory.py --batch 1024 --bottleneck 64 --layer 2
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from tests.factories import tiny_imagegpt  # noqa: E402
from workers.adapters import fit_adapter  # noqa: E402
from workers.datasets import load_split  # noqa: E402
from workers.imagegpt import build_input_ids  # noqa: E402
from workers.modelref import resolve_model  # noqa: E402
from workers.models import ImageGPTAdapter  # noqa: E402
from workers.probes.settings import adapter_fit_bytes, adapter_fit_shape  # noqa: E402


def resident_bytes() -> int:
    """Return the current resident size of this process."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, required=True, help="adapter batch_size")
    parser.add_argument("--bottleneck", type=int, required=True)
    parser.add_argument("--layer", type=int, required=True, help="hidden-state index probed")
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-embd", type=int, default=32)
    parser.add_argument("--n-head", type=int, default=2)
    parser.add_argument("--size", type=int, default=8, help="image side in pixels")
    parser.add_argument("--train", type=int, default=1297, help="digits train items used")
    parser.add_argument("--test", type=int, default=100, help="digits test items used")
    parser.add_argument("--models", type=Path, default=Path("/tmp/layerbank-adapter-memory"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    path = args.models / f"igpt-{args.n_layer}-{args.n_embd}-{args.n_head}-{args.size}"
    if not path.exists():
        tiny_imagegpt(
            path, n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, size=args.size
        )
    ref = resolve_model(str(path), models_dir=None)
    model = ImageGPTAdapter(ref, device="cpu", input_policy="plain")
    splits = {name: load_split("digits", name) for name in ("train", "test")}
    ids = {
        name: build_input_ids(model.tokens(split.images), policy="plain", sos_token=model.sos_token)
        for name, split in splits.items()
    }
    train_ids, test_ids = ids["train"][: args.train], ids["test"][: args.test]

    before = resident_bytes()
    fit_adapter(
        model.model,
        train_ids,
        splits["train"].labels[: args.train],
        test_ids,
        splits["test"].labels[: args.test],
        layer=args.layer,
        pooling="mean",
        params={"epochs": 1, "batch_size": args.batch, "bottleneck": args.bottleneck},
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    shape = adapter_fit_shape(
        model.model.config.to_dict(),
        seq_len=int(train_ids.shape[1]),
        layer=args.layer,
        # The fit part is about 80% of train with the default val_fraction; the larger part counts.
        max_batch_items=max(round(0.8 * len(train_ids)), len(test_ids)),
    )
    estimate = adapter_fit_bytes(shape, args.batch, args.bottleneck)
    print(
        f"batch {args.batch}, bottleneck {args.bottleneck}, layer {args.layer}, "
        f"{shape.seq_len} tokens, width {shape.dim}: measured {(peak - before) / 2**20:.0f} MiB, "
        f"estimate {estimate / 2**20:.0f} MiB"
    )


if __name__ == "__main__":
    main()
