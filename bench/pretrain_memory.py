"""Measure the peak memory of pretraining steps and compare it with the API's estimate.

Builds the ImageGPT that `workers.pretrain.pretrain_imagegpt` builds for the given sizes and
runs two training steps (forward, backward, AdamW) on random token ids on one CPU thread.
Prints the growth of the process's peak RSS next to
`workers.pretrain_memory.estimate_pretrain_memory` for the same sizes. The estimate is meant to
stay above the measurement. The dataset's token ids are not loaded here, so the estimate's data
term is left out of the comparison. Run by hand, never in CI:

    .venv/bin/python bench/pretrain_memory.py --n-layer 4 --n-embd 64 --n-head 4 --batch 256
"""

from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.adapter_memory import resident_bytes  # noqa: E402
from workers.pretrain_memory import PretrainShape, estimate_pretrain_memory  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=64)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--n-colors", type=int, default=16)
    parser.add_argument("--batch", type=int, default=64, help="pretraining batch_size")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per image (height x width)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling

    torch.manual_seed(0)
    config = ImageGPTConfig(
        vocab_size=args.n_colors + 1,
        n_positions=args.tokens,
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        n_head=args.n_head,
        resid_pdrop=0.1,
        embd_pdrop=0.1,
        attn_pdrop=0.1,
    )
    inputs = torch.randint(args.n_colors + 1, (args.batch, args.tokens))
    targets = torch.randint(args.n_colors, (args.batch, args.tokens))

    before = resident_bytes()
    model = ImageGPTForCausalImageModeling(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(2):
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, args.n_colors), targets.reshape(-1)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    shape = PretrainShape(
        n_layer=args.n_layer,
        n_embd=args.n_embd,
        n_head=args.n_head,
        n_colors=args.n_colors,
        batch_size=args.batch,
        seq_len=args.tokens,
        n_items=1,
    )
    memory = estimate_pretrain_memory(shape)
    estimate = memory.total_bytes - memory.data_bytes
    print(
        f"n_layer {args.n_layer}, n_embd {args.n_embd}, n_head {args.n_head}, batch "
        f"{args.batch}, {args.tokens} tokens: measured {(peak - before) / 2**20:.0f} MiB, "
        f"estimate {estimate / 2**20:.0f} MiB"
    )


if __name__ == "__main__":
    main()
