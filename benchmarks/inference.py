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
  ``GPTNeoXForCausalLM.generate`` on the same weights, with its default dynamic cache or
  (``--hf-cache static``) its static cache, the fast form its documentation recommends.
* ``head``: the products with the vocabulary matrices on the few rows of a decode step,
  :class:`zoo.blocks.VocabHead` against ``F.linear`` (what ``nn.Linear`` runs) and
  :func:`zoo.blocks.expected_embedding` against ``probs @ weight``, on the same weight.

Weights are random (the timing does not depend on them; halting is set by the policy).

How transformers is compiled with ``--compile`` (the installed transformers 5.x): with the
dynamic cache, ``torch.compile`` of its ``forward``, as for zoo. With the static cache,
``generate`` compiles the forward of its decode steps itself (the prefill stays eager)
whenever the cache is static and the device is CUDA, under a ``CompileConfig`` whose defaults
are inductor with ``mode="reduce-overhead"`` (CUDA graphs): the script passes that default
``CompileConfig`` and leaves ``forward`` alone, so nothing is compiled twice (on the CPU it
also sets transformers' flag for compiling there, which it reserves for testing). Without
``--compile``, ``disable_compile=True`` keeps transformers' static-cache decoding eager,
like zoo's. A static cache is sized to the prompt plus the new tokens, and ``generate``
reuses it, and its compiled graphs, from call to call at the same batch size; the untimed
first calls (the token check and the warm-up) compile.

    python benchmarks/inference.py                       # everything, CPU, fp32
    python benchmarks/inference.py --only prefill --sizes 70m --batch 8
    python benchmarks/inference.py --device cuda --dtype bfloat16 --compile
    python benchmarks/inference.py --only generate --sizes 160m --batch 8 --prompt-len 128 \\
        --new-tokens 256 --device cuda --dtype bfloat16 --compile --hf-cache static

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
    p.add_argument("--compile", action="store_true", help="zoo.compile the models, and compile transformers'")
    p.add_argument(
        "--compile-mode",
        default="default",
        choices=["default", "reduce-overhead", "max-autotune"],
        help="torch.compile mode of zoo's models with --compile (reduce-overhead: CUDA graphs; default: default)",
    )
    p.add_argument(
        "--hf-cache",
        default="dynamic",
        choices=["dynamic", "static"],
        help="transformers' KV cache in generate (default: dynamic; static: cache_implementation='static')",
    )
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/inference-<device>.json)")
    return p.parse_args(argv)


# Timing ---------------------------------------------------------------------------------


def require_device(device: str) -> None:
    """Exits with a message naming the problem when ``device`` is CUDA and torch sees none."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        build = torch.__version__  # "+cpu" at its end: a build without CUDA
        raise SystemExit(f"--device {device}: CUDA is not available (torch {build}); use --device cpu")


def sync(device: str) -> None:
    """Waits for the queued CUDA kernels, so that a timing covers them."""
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
    return compiled(model, args)


def compiled(model, args):
    """``model`` through :func:`zoo.compile` in ``--compile-mode`` when ``--compile`` is given."""
    if not args.compile:
        return model
    return zoo.compile(model) if args.compile_mode == "default" else zoo.compile(model, mode=args.compile_mode)


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


def hf_compile(args) -> str:
    """How transformers' side of ``generate`` is compiled (see the module docstring)."""
    if not args.compile:
        return "none"
    if args.hf_cache == "dynamic":
        return "torch.compile(forward)"
    return "generate, decode steps: CompileConfig() (inductor, mode='reduce-overhead')"


def hf_generate_options(args) -> dict:
    """Keyword arguments of transformers' ``generate``: greedy, exactly ``new_tokens`` tokens."""
    from transformers import CompileConfig

    options = {
        "max_new_tokens": args.new_tokens,
        "min_new_tokens": args.new_tokens,
        "do_sample": False,
        "pad_token_id": 0,
    }
    if args.hf_cache == "static":
        options["cache_implementation"] = "static"
        if not args.compile:
            options["disable_compile"] = True  # else generate compiles a static-cache forward on CUDA
        else:
            config = CompileConfig()  # transformers' defaults for its own compilation
            # generate compiles on CUDA (and a few others) only, unless this flag is set
            config._compile_all_devices = not args.device.startswith("cuda")
            options["compile_config"] = config
    return options


@torch.no_grad()
def bench_generate(args) -> list[dict]:
    from transformers import GPTNeoXForCausalLM

    rows = []
    T, M = args.prompt_len, args.new_tokens
    dtype = getattr(torch, args.dtype)
    options = hf_generate_options(args)
    for size in args.sizes.split(","):
        torch.manual_seed(0)
        model = zoo.build(f"pythia-{size}").eval()
        with tempfile.TemporaryDirectory() as folder:
            zoo.to_hf(model, folder)
            hf = GPTNeoXForCausalLM.from_pretrained(folder, dtype=dtype).to(args.device).eval()
        model = model.to(args.device, dtype)
        compiled(model, args)
        if args.compile and args.hf_cache == "dynamic":
            hf.forward = torch.compile(hf.forward)
        for B in [int(b) for b in args.batch.split(",")]:
            prompt = random_ids(B, T, model.config.vocab_size, args.device)
            ours = model.generate(prompt, M, progress=False).tokens
            theirs = hf.generate(prompt, **options)
            agree = float((ours[:, T:] == theirs[:, T:]).float().mean())
            t = alternate(
                {
                    "zoo": lambda: model.generate(prompt, M, progress=False),
                    "transformers": lambda: hf.generate(prompt, **options),
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
    print_table(
        f"Dense greedy generation, prompt {T}, {M} new tokens, transformers with the {args.hf_cache} cache, "
        f"compiled: {hf_compile(args)} (zoo / hf > 1: zoo faster)",
        rows,
    )
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
    require_device(args.device)
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
        "compile_mode": args.compile_mode,
        "hf_cache": args.hf_cache,
        "hf_compile": hf_compile(args),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "gpu": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else None,
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
