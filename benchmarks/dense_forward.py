"""Dense forward time of zoo against transformers' GPT-NeoX, on the same weights.

Builds a randomly initialised ``pythia-70m`` (or another preset), writes it with
``zoo.to_hf`` and loads it back with ``GPTNeoXForCausalLM.from_pretrained``, both in the
same dtype on the same device, checks that both compute the same logits, then times one
no-grad forward of each, alternately (the order flips every repeat so that neither side
always runs on a warmer cache), and reports the medians and the ratio zoo / transformers
(below 1: zoo is faster).

With ``--compile`` both sides are compiled with their defaults: ``zoo.compile(model)``
and ``torch.compile`` of transformers' ``forward``. The logit check and the warm-up
forwards run first, so compilation is never timed. On CUDA every timing waits for the
queued kernels (``torch.cuda.synchronize``) before it reads the clock.

    python benchmarks/dense_forward.py                  # pythia-70m, batch 4 x 256, fp32, CPU
    python benchmarks/dense_forward.py --repeats 20 --threads 2 --out /tmp/bench.json
    python benchmarks/dense_forward.py --preset pythia-160m --batch 8 --seq-len 2048 \\
        --device cuda --dtype bfloat16 --compile --repeats 20 --warmup 3

Prints a table and writes JSON (default ``benchmarks/results/dense_forward.json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import zoo

DEFAULT_OUT = Path(__file__).parent / "results" / "dense_forward.json"
DTYPES = ("float32", "bfloat16", "float16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="pythia-70m", help="a single-pass preset (default: pythia-70m)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per forward (default: 4)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: 256)")
    parser.add_argument("--repeats", type=int, default=10, help="timed forwards of each model (default: 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed forwards of each first (default: 2)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    parser.add_argument(
        "--device", default="cpu", choices=["cpu", "cuda"], help="where both run (default: cpu)"
    )
    parser.add_argument(
        "--dtype", default="float32", choices=DTYPES, help="weights and compute of both (default: float32)"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="zoo.compile ours and torch.compile transformers' forward (compiled in the untimed warm-up)",
    )
    parser.add_argument(
        "--hf-attn",
        default="sdpa",
        choices=["sdpa", "eager"],
        help="transformers attention implementation (default: sdpa, its default)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the input (default: 0)")
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="JSON results path (default: benchmarks/results/dense_forward.json)",
    )
    return parser.parse_args(argv)


def require_device(device: str) -> None:
    """Exits with a message naming the problem when ``device`` is CUDA and torch sees none."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        build = torch.__version__  # "+cpu" at its end: a build without CUDA
        raise SystemExit(f"--device {device}: CUDA is not available (torch {build}); use --device cpu")


def timed(fn, device: str) -> float:
    """Milliseconds of ``fn()``; on CUDA the clock is read with no kernel queued (synchronised)."""
    wait = torch.cuda.synchronize if device == "cuda" else lambda: None
    wait()
    start = time.perf_counter()
    fn()
    wait()
    return (time.perf_counter() - start) * 1e3


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    require_device(args.device)
    from transformers import GPTNeoXForCausalLM

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    # Build: one set of random weights, loaded by both libraries.
    dtype = getattr(torch, args.dtype)
    model = zoo.build(args.preset).eval()
    with tempfile.TemporaryDirectory() as folder:
        zoo.to_hf(model, folder)
        hf = GPTNeoXForCausalLM.from_pretrained(folder, attn_implementation=args.hf_attn, dtype=dtype)
    hf = hf.to(args.device).eval()
    model = model.to(args.device, dtype)
    if args.compile:
        zoo.compile(model)
        hf.forward = torch.compile(hf.forward)
    # drawn on the CPU, so that every device and dtype sees the same tokens
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len)).to(args.device)

    def run_zoo() -> torch.Tensor:
        return model(ids, execution="dense").logits

    def run_hf() -> torch.Tensor:
        return hf(input_ids=ids, use_cache=False).logits

    with torch.inference_mode():
        ours, theirs = run_zoo().float(), run_hf().float()  # the first calls compile
        max_diff = (ours - theirs).abs().max().item()
        max_logit = theirs.abs().max().item()
        del ours, theirs
        for _ in range(args.warmup):
            run_zoo(), run_hf()
        zoo_ms, hf_ms = [], []
        for repeat in range(args.repeats):
            pair = [(zoo_ms, run_zoo), (hf_ms, run_hf)]
            for times, fn in pair if repeat % 2 == 0 else pair[::-1]:
                times.append(timed(fn, args.device))

    result = {
        "preset": args.preset,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "dtype": args.dtype,
        "device": args.device,
        "compile": args.compile,
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "threads": torch.get_num_threads(),
        "hf_attn": args.hf_attn,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "machine": platform.machine(),
        "max_abs_logit_diff": max_diff,
        "max_abs_logit": max_logit,
        "zoo_ms": zoo_ms,
        "transformers_ms": hf_ms,
        "zoo_median_ms": statistics.median(zoo_ms),
        "transformers_median_ms": statistics.median(hf_ms),
    }
    result["ratio_zoo_over_transformers"] = result["zoo_median_ms"] / result["transformers_median_ms"]

    print(
        f"dense forward, {args.preset}, batch {args.batch} x {args.seq_len}, {args.dtype} {args.device}"
        f"{', both compiled' if args.compile else ''}, {result['threads']} threads, "
        f"{args.repeats} alternating repeats"
    )
    print(f"{'model':<22}{'median ms':>12}{'min ms':>10}{'max ms':>10}")
    for label, times in (("zoo", zoo_ms), (f"transformers ({args.hf_attn})", hf_ms)):
        print(f"{label:<22}{statistics.median(times):>12.1f}{min(times):>10.1f}{max(times):>10.1f}")
    print(f"ratio zoo / transformers: {result['ratio_zoo_over_transformers']:.3f}")
    print(f"max |logit diff|: {max_diff:.2e} (max |logit| {max_logit:.2f})")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
