"""Time a training step of the demo's model under CPU contention, per torch thread setting.

The bench starts each count in ``--burners`` of extra processes that spin on a core. Under
each, it runs every combination of ``--threads`` and OpenMP wait policy (the default, which
spins, and ``PASSIVE``) in a fresh subprocess. That subprocess times one forward pass, backward
pass and AdamW step of the model that `layerbank demo` pretrains (ImageGPT, 4 layers, width 64,
8 x 8 inputs, 17 tokens, batch 64) and prints the median, minimum and maximum over ``--steps``
steps. The wait policy must be set
before torch starts its thread pool, hence one subprocess per setting.

Example::

    python -m bench.threads --threads 1 2 --burners 0 1 2 --steps 10
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads")
    parser.add_argument(
        "--burners", type=int, nargs="+", default=[0, 1, 2], help="spinning processes"
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps per setting")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def time_steps(steps: int) -> list[float]:
    """Return the seconds of each of ``steps`` training steps, after two warm-up steps."""
    import torch
    from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling

    torch.manual_seed(0)
    config = ImageGPTConfig(vocab_size=17, n_positions=64, n_embd=64, n_layer=4, n_head=4)
    model = ImageGPTForCausalImageModeling(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    inputs = torch.randint(17, (64, 64))
    targets = torch.randint(16, (64, 64))
    seconds = []
    for step in range(steps + 2):
        started = time.perf_counter()
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step >= 2:
            seconds.append(time.perf_counter() - started)
    return seconds


def run_setting(threads: int, policy: str | None, steps: int) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env.pop("OMP_WAIT_POLICY", None)
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    command = [sys.executable, "-m", "bench.threads", "--child", "--steps", str(steps)]
    return subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout


def main() -> None:
    args = parse_args()
    if args.child:
        seconds = time_steps(args.steps)
        print(
            f"median {statistics.median(seconds):.3f} s, min {min(seconds):.3f} s, "
            f"max {max(seconds):.3f} s"
        )
        return
    print(f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}, {args.steps} steps per setting")
    for burners in args.burners:
        spinning = [
            subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(burners)
        ]
        try:
            time.sleep(1)
            for threads in args.threads:
                for policy in (None, "PASSIVE"):
                    result = run_setting(threads, policy, args.steps).strip()
                    name = policy or "default"
                    print(f"burners {burners}, threads {threads}, wait {name:7s}: {result}")
        finally:
            for process in spinning:
                process.kill()
                process.wait()


if __name__ == "__main__":
    main()
