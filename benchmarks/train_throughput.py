"""Training throughput: tokens/s and model FLOPs utilisation, one-pass, dense 4-pass and adaptive.

Times full training steps (forward, backward, AdamW update; dense execution, as
:func:`zoo.train.train` runs them) of three models of the same size side by side:
``pythia-<size>`` (one pass), ``ponder-pythia-<size>`` (PonderLM, every token 4 passes) and
``adaponder-pythia-<size>`` (AdaPonder gates). Training is dense, so the adaptive model pays
for every pass plus its gates; its savings come at inference (``benchmarks/inference.py``).
What the gates cost in training is the step-time ratio AdaPonder / PonderLM
(``adaponder_over_ponder_step``; 1.10: AdaPonder's step takes 10% longer).

Model FLOPs per step are ``3 x`` the forward's matrix-product FLOPs (:func:`zoo.flops.count`,
dense: forward once, backward twice). Utilisation (MFU) divides the achieved FLOP/s by a
peak: ``--peak-tflops``, or else the throughput of a large matrix product measured here in
the same dtype and thread count (on a CPU there is no datasheet number to trust).

    python benchmarks/train_throughput.py                          # tiny at width 128, CPU, fp32
    python benchmarks/train_throughput.py --size 160m --device cuda --bf16 --compile \\
        --batch 8 --seq-len 2048 --peak-tflops 989

On CUDA every timing waits for the queued kernels (``torch.cuda.synchronize``); with
``--compile`` the warm-up steps compile, untimed.

Prints a table and writes JSON (default ``benchmarks/results/train_throughput.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import zoo
from zoo import flops
from zoo.train import TrainConfig, lm_loss, make_optimizer

DEFAULT_OUT = Path(__file__).parent / "results" / "train_throughput.json"
FAMILIES = ("pythia", "ponder-pythia", "adaponder-pythia")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; ``--help`` lists every option."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", default="tiny", help="preset size: tiny, 14m, 70m, 160m, ... (default: tiny)")
    p.add_argument(
        "--override",
        action="append",
        default=None,
        metavar="FIELD=JSON",
        help="ModelConfig overrides for all three (default for tiny: dim=128)",
    )
    p.add_argument("--batch", type=int, default=16, help="sequences per step (default: 16)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default: 128)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per model (default: 10)")
    p.add_argument(
        "--warmup", type=int, default=2, help="untimed steps first, compilation included (default: 2)"
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to train (default: cpu)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (as the trainer on CUDA)")
    p.add_argument("--compile", action="store_true", help="compile the dense forward (zoo.compile)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="peak TFLOP/s for MFU (default: measured matmul)"
    )
    p.add_argument("--seed", type=int, default=0, help="weights and data seed (default: 0)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results path")
    return p.parse_args(argv)


def require_device(device: str) -> None:
    """Exits with a message naming the problem when ``device`` is CUDA and torch sees none."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        build = torch.__version__  # "+cpu" at its end: a build without CUDA
        raise SystemExit(f"--device {device}: CUDA is not available (torch {build}); use --device cpu")


def sync(device: str) -> None:
    """Waits for queued CUDA work, so that timings cover it."""
    if device == "cuda":
        torch.cuda.synchronize()


def measured_peak(device: str, dtype: torch.dtype, n: int = 1024, repeats: int = 10) -> float:
    """FLOP/s of an ``n x n`` matrix product, the best of ``repeats``: an achievable peak."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def bench_model(name: str, args: argparse.Namespace, overrides: dict) -> dict:
    """Times training steps of preset ``name``; returns its row of the table."""
    torch.manual_seed(args.seed)
    model = zoo.build(name, **overrides).to(args.device).train()
    if args.compile:
        zoo.compile(model)
    optimizer = make_optimizer(model, TrainConfig(steps=1))
    batch = torch.randint(
        0, min(model.config.vocab_size, 256), (args.batch, args.seq_len + 1), device=args.device
    )
    autocast = torch.autocast(args.device, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
    step = torch.tensor(0, device=args.device)
    times, depth = [], None
    for i in range(args.warmup + args.steps):
        sync(args.device)
        start = time.perf_counter()
        with autocast:
            out = model(batch[:, :-1], execution="dense", step=step)
            loss = lm_loss(out.logits, batch[:, 1:]) + out.aux_loss.float()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(args.device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
        depth = out.depth
    seconds = statistics.median(times)
    step_flops = 3 * flops.count(model, depth, execution="dense").flops
    return {
        "model": name,
        "parameters": model.num_parameters(),
        "passes": model.config.passes,
        "step_seconds": seconds,
        "tokens_per_s": args.batch * args.seq_len / seconds,
        "flops_per_step": step_flops,
        "tflops": step_flops / seconds / 1e12,
    }


def main(argv: list[str] | None = None) -> dict:
    """Benchmarks the three models, prints the table and writes the JSON."""
    args = parse_args(argv)
    require_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    raw = args.override if args.override is not None else (["dim=128"] if args.size == "tiny" else [])
    overrides = {k: json.loads(v) for k, _, v in (item.partition("=") for item in raw)}
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    peak = args.peak_tflops * 1e12 if args.peak_tflops else measured_peak(args.device, dtype)
    rows = [bench_model(f"{family}-{args.size}", args, overrides) for family in FAMILIES]
    for row in rows:
        row["mfu"] = row["tflops"] * 1e12 / peak
    step = {family: row["step_seconds"] for family, row in zip(FAMILIES, rows)}
    adaponder_over_ponder = step["adaponder-pythia"] / step["ponder-pythia"]
    print(
        f"training steps of {args.batch} x {args.seq_len} tokens on {args.device} "
        f"({'bf16' if args.bf16 else 'fp32'}{', compiled' if args.compile else ''}, "
        f"{torch.get_num_threads()} threads), "
        f"peak {peak / 1e12:.3f} TFLOP/s ({'given' if args.peak_tflops else 'measured matmul'})"
    )
    print("| model | passes | parameters | step (ms) | tokens/s | model TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['passes']} | {r['parameters']:,} | {1000 * r['step_seconds']:.1f} | "
            f"{r['tokens_per_s']:,.0f} | {r['tflops']:.4f} | {100 * r['mfu']:.1f}% |"
        )
    print(f"step time AdaPonder / PonderLM: {adaponder_over_ponder:.3f}")
    result = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "overrides": overrides,
        "peak_flops": peak,
        "peak_source": "given" if args.peak_tflops else "measured matmul",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "results": rows,
        "adaponder_over_ponder_step": adaponder_over_ponder,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
