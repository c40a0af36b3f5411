"""What halting buys at inference: sparse prefill, decoding, and dense generation.

Three measurements, each side by side in one run (the timed variants alternate, so that
machine noise falls on all of them alike), each against its ideal:

* ``prefill``: a sparse forward of ``adaponder-pythia-{size}`` whose ``fixed_prune`` policy
  halts 0/25/50/75% of the pondering work (passes 1..P-1), B in {1, 8}, T = 512. The
  measured time ratio against 0% is set beside the ideal ratio from the executed
  multiply-accumulates (:mod:`zoo.flops`, sparse execution); efficiency = ideal / measured.
  The dense (masked) execution of the same model is timed too: it saves nothing.
* ``decode``: tokens/s of :meth:`generate` at B in {1, 8} with halting off and at 50%,
  against the ideal from the decode steps' multiply-accumulates.
* ``generate``: greedy generation with the plain ``pythia-{size}`` against transformers'
  ``GPTNeoXForCausalLM.generate`` on the same weights.
* ``head``: the products with the vocabulary matrices on the few rows of a decode step,
  :class:`zoo.blocks.VocabHead` against ``F.linear`` (what ``nn.Linear`` runs) and
  :func:`zoo.blocks.expected_embedding` against ``probs @ weight``, on the same weight.

Weights are random (the timing does not depend on them; halting is set by the policy).

    python benchmarks/inference.py                       # everything, CPU, fp32
    python benchmarks/inference.py --only prefill --sizes 70m --batch 8
    python benchmarks/inference.py --device cuda --dtype bfloat16 --compile

Prints one table per measurement and writes JSON (default
``benchmarks/results/inference-<device>.json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

import zoo
from zoo import flops
from zoo.halting.fixed_prune import ratio_for_depth

RESULTS = Path(__file__).parent / "results"
PARTS = ("prefill", "decode", "generate", "head")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts to run (default: {','.join(PARTS)})")
    p.add_argument("--sizes", default="70m,160m", help="Pythia sizes (default: 70m,160m)")
    p.add_argument("--batch", default="1,8", help="batch sizes (default: 1,8)")
    p.add_argument("--seq-len", type=int, default=512, help="prefill tokens per row (default: 512)")
    p.add_argument("--halting", default="0,0.25,0.5,0.75", help="halted shares of the pondering work for prefill")
    p.add_argument("--prompt-len", type=int, default=64, help="decode/generate prompt tokens (default: 64)")
    p.add_argument("--new-tokens", type=int, default=64, help="decode/generate new tokens (default: 64)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each variant (default: 3)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--compile", action="store_true", help="zoo.compile the models (and torch.compile transformers')")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/inference-<device>.json)")
    return p.parse_args(argv)


# Timing ---------------------------------------------------------------------------------


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def alternate(variants: dict, repeats: int, device: str) -> dict[str, float]:
    """Median seconds of each variant; one warm-up each, then the variants take turns."""
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(repeats):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            sync(device)
            start = time.perf_counter()
            variants[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n{title}")
    if not rows:
        return
    cols = list(rows[0])
    cells = [[_fmt(row[c]) for c in cols] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for r in cells:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths)))


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


# Models ---------------------------------------------------------------------------------


def prune_model(size: str, share: float, args, state=None):
    """``adaponder-pythia-{size}`` with fixed pruning that halts ``share`` of the pondering work."""
    passes = 4
    ratio = ratio_for_depth(1 + (passes - 1) * (1 - share), passes) if share > 0 else 0.0
    model = zoo.build(
        f"adaponder-pythia-{size}", halting="fixed_prune", halting_kwargs={"ratio": ratio}, max_seq_len=2048
    )
    if state is not None:
        model.load_state_dict(state)
    model = model.to(args.device, getattr(torch, args.dtype)).eval()
    return zoo.compile(model) if args.compile else model


def random_ids(B: int, T: int, vocab: int, device: str) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(0)).to(device)


# Parts ----------------------------------------------------------------------------------


@torch.no_grad()
def bench_prefill(args) -> list[dict]:
    rows = []
    shares = [float(s) for s in args.halting.split(",")]
    for size in args.sizes.split(","):
        base = prune_model(size, 0.0, args)
        models = {s: prune_model(size, s, args, base.state_dict()) for s in shares}
        for B in [int(b) for b in args.batch.split(",")]:
            ids = random_ids(B, args.seq_len, base.config.vocab_size, args.device)
            depth = {s: m(ids).depth for s, m in models.items()}
            ideal = {s: flops.count(models[s], depth[s], execution="sparse").total for s in shares}
            variants = {f"sparse {s}": (lambda m=m: m(ids, execution="sparse")) for s, m in models.items()}
            variants["dense 0.5"] = lambda: models[0.5 if 0.5 in models else shares[-1]](ids, execution="dense")
            t = alternate(variants, args.repeats, args.device)
            for s in shares:
                measured = t[f"sparse {s}"] / t[f"sparse {shares[0]}"]
                ideal_ratio = ideal[s] / ideal[shares[0]]
                rows.append(
                    {
                        "size": size,
                        "B": B,
                        "halted": s,
                        "mean depth": float(depth[s].float().mean()),
                        "ms": 1000 * t[f"sparse {s}"],
                        "measured": measured,
                        "ideal": ideal_ratio,
                        "efficiency": ideal_ratio / measured,
                    }
                )
            rows.append(
                {
                    "size": size,
                    "B": B,
                    "halted": "dense 0.5",
                    "mean depth": float(depth[0.5 if 0.5 in models else shares[-1]].float().mean()),
                    "ms": 1000 * t["dense 0.5"],
                    "measured": t["dense 0.5"] / t[f"sparse {shares[0]}"],
                    "ideal": float("nan"),
                    "efficiency": float("nan"),
                }
            )
    print_table(f"Sparse prefill, T={args.seq_len} (ratios against 0% halting)", rows)
    return rows


@torch.no_grad()
def bench_decode(args) -> list[dict]:
    rows = []
    T, M = args.prompt_len, args.new_tokens
    for size in args.sizes.split(","):
        base = prune_model(size, 0.0, args)
        models = {0.0: base, 0.5: prune_model(size, 0.5, args, base.state_dict())}
        for B in [int(b) for b in args.batch.split(",")]:
            prompt = random_ids(B, T, base.config.vocab_size, args.device)
            work = {}
            for s, m in models.items():
                full = m(m.generate(prompt, M, progress=False).tokens[:, : T + M - 1]).depth  # the positions decoding runs
                work[s] = flops.count(m, full, execution="sparse").total - flops.count(m, full[:, :T], execution="sparse").total
            variants = {}
            for s, m in models.items():
                variants[f"gen {s}"] = lambda m=m: m.generate(prompt, M, progress=False)
                variants[f"prefill {s}"] = lambda m=m: m(prompt)
            t = alternate(variants, args.repeats, args.device)
            decode = {s: t[f"gen {s}"] - t[f"prefill {s}"] for s in models}
            for s in models:
                measured, ideal = decode[s] / decode[0.0], work[s] / work[0.0]
                rows.append(
                    {
                        "size": size,
                        "B": B,
                        "halted": s,
                        "tok/s": B * M / decode[s],
                        "measured": measured,
                        "ideal": ideal,
                        "efficiency": ideal / measured,
                    }
                )
    print_table(f"Decoding, prompt {T}, {M} new tokens (decode time = generate - prefill)", rows)
    return rows


@torch.no_grad()
def bench_generate(args) -> list[dict]:
    from transformers import GPTNeoXForCausalLM

    rows = []
    T, M = args.prompt_len, args.new_tokens
    dtype = getattr(torch, args.dtype)
    for size in args.sizes.split(","):
        torch.manual_seed(0)
        model = zoo.build(f"pythia-{size}").eval()
        with tempfile.TemporaryDirectory() as folder:
            zoo.to_hf(model, folder)
            hf = GPTNeoXForCausalLM.from_pretrained(folder, torch_dtype=dtype).to(args.device).eval()
        model = model.to(args.device, dtype)
        if args.compile:
            zoo.compile(model)
            hf.forward = torch.compile(hf.forward)
        for B in [int(b) for b in args.batch.split(",")]:
            prompt = random_ids(B, T, model.config.vocab_size, args.device)
            ours = model.generate(prompt, M, progress=False).tokens
            theirs = hf.generate(prompt, max_new_tokens=M, min_new_tokens=M, do_sample=False, pad_token_id=0)
            agree = float((ours[:, T:] == theirs[:, T:]).float().mean())
            t = alternate(
                {
                    "zoo": lambda: model.generate(prompt, M, progress=False),
                    "transformers": lambda: hf.generate(
                        prompt, max_new_tokens=M, min_new_tokens=M, do_sample=False, pad_token_id=0
                    ),
                },
                args.repeats,
                args.device,
            )
            rows.append(
                {
                    "size": size,
                    "B": B,
                    "zoo tok/s": B * M / t["zoo"],
                    "hf tok/s": B * M / t["transformers"],
                    "zoo / hf": t["transformers"] / t["zoo"],
                    "same tokens": agree,
                }
            )
    print_table(f"Dense greedy generation, prompt {T}, {M} new tokens (zoo / hf > 1: zoo faster)", rows)
    return rows


@torch.no_grad()
def bench_head(args) -> list[dict]:
    import torch.nn.functional as F

    from zoo.blocks import VocabHead, expected_embedding

    rows_out = []
    dtype = getattr(torch, args.dtype)
    for size in args.sizes.split(","):
        config = zoo.preset(f"pythia-{size}")
        torch.manual_seed(0)
        head = VocabHead(config.dim, config.vocab_size).to(args.device, dtype)
        weight = head.weight
        for rows in (1, 2, 8, 64):
            h = torch.randn(rows, 1, config.dim, device=args.device, dtype=dtype)
            probs = torch.softmax(torch.randn(rows, 1, config.vocab_size, device=args.device), -1).to(dtype)
            pairs = {
                "head": (lambda: head(h), lambda: F.linear(h, weight)),
                "embedding": (lambda: expected_embedding(probs, weight), lambda: probs @ weight),
            }
            for product, (fast, plain) in pairs.items():
                t = alternate({"zoo": fast, "plain": plain}, max(args.repeats, 20), args.device)
                rows_out.append(
                    {
                        "size": size,
                        "product": product,
                        "rows": rows,
                        "zoo ms": 1000 * t["zoo"],
                        "plain ms": 1000 * t["plain"],
                        "speed-up": t["plain"] / t["zoo"],
                    }
                )
    print_table(
        "Vocabulary products on a decode step's rows: zoo.blocks against the plain product (speed-up > 1: faster)",
        rows_out,
    )
    return rows_out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = [p for p in args.only.split(",") if p]
    for p in parts:
        if p not in PARTS:
            raise SystemExit(f"--only: unknown part {p!r}; choose from {', '.join(PARTS)}")
    results = {
        "date": date.today().isoformat(),
        "device": args.device,
        "dtype": args.dtype,
        "compile": args.compile,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
    }
    runners = {
        "prefill": bench_prefill, "decode": bench_decode, "generate": bench_generate, "head": bench_head
    }
    for p in parts:
        results[p] = runners[p](args)
    out = args.out or RESULTS / f"inference-{args.device.split(':')[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")
    return results


if __name__ == "__main__":
    main()
