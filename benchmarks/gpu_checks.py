"""What must hold on a GPU before its speed figures mean anything, measured at a real shape.

Five checks, each recorded whether it passes or not (one failing check does not stop the
others), written to one JSON file:

* ``precision``: sparse execution and greedy decoding against the dense forward
  (:func:`zoo.testing.precision.compare_executions`) in float32 and bfloat16, for fixed
  pruning at half the pondering work and a randomly initialised AdaPonder gate; held to
  :data:`zoo.testing.precision.TOLERANCES`.
* ``compile_dense``: the dense forward traced with no graph break
  (``torch._dynamo.explain``), then forward and backward through ``zoo.compile``
  (``fullgraph=True``) against eager: logits and gradients.
* ``decode_recompiles``: compiled frames after 2 and after 200 decode steps whose halting
  differs from step to step (random gates): equal when no step recompiles.
* ``host_syncs``: host reads of device values (``.item()``, ``bool()``, ``int()`` of a
  tensor: ``aten._local_scalar_dense``) per decode step and per pass, counted eagerly
  with a dispatch mode (compiled passes run the same layout code between them), and the
  lines that make them.
* ``cuda_graphs``: decode tokens/s with ``zoo.compile`` in the default mode and in
  ``mode="reduce-overhead"`` (CUDA graphs), alternating; an error is recorded as such.

    python benchmarks/gpu_checks.py --out /tmp/gpu/checks.json            # CUDA, 160M shape
    python benchmarks/gpu_checks.py --device cpu --smoke --out checks.json   # the plumbing, tiny

``benchmarks/gpu.sh`` runs it with the benchmarks, each under a time limit.
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils._python_dispatch import TorchDispatchMode

import zoo
from zoo.checkpoint import atomic_write
from zoo.halting.fixed_prune import ratio_for_depth
from zoo.recurrence import run_dense
from zoo.testing.precision import TOLERANCES, compare_executions

CHECKS = ("precision", "compile_dense", "decode_recompiles", "host_syncs", "cuda_graphs")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="where to run (default: cuda)")
    p.add_argument("--preset", default="adaponder-pythia-160m", help="model shape (default: adaponder-pythia-160m)")
    p.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated checks (default: {','.join(CHECKS)})")
    p.add_argument("--batch", type=int, default=4, help="rows of the precision and compile checks (default: 4)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per row there (default: 256)")
    p.add_argument("--decode-batch", type=int, default=8, help="rows of the decode checks (default: 8)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes and few steps: checks the plumbing only")
    p.add_argument("--out", type=Path, required=True, help="JSON path")
    args = p.parse_args(argv)
    unknown = sorted(set(args.only.split(",")) - set(CHECKS))
    if unknown:
        p.error(f"unknown check {unknown[0]!r}; choose from {', '.join(CHECKS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device} but torch sees no CUDA device; use --device cpu (with --smoke)")
    if args.smoke:
        args.preset, args.batch, args.seq_len, args.decode_batch = "adaponder-pythia-tiny", 2, 32, 3
    return args


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def model_for(args: argparse.Namespace, halting: str, seed: int = 0, **overrides: Any) -> zoo.RecurrentLM:
    """``args.preset`` with ``halting`` set to halt about half the pondering work, on the device."""
    torch.manual_seed(seed)
    kwargs = {"ratio": ratio_for_depth(2.5, 4)} if halting == "fixed_prune" else {"threshold": 0.5, "bias_init": 0.0}
    model = zoo.build(args.preset, halting=halting, halting_kwargs=kwargs, passes=4, **overrides)
    if halting == "mlp_gate":  # gates as trained ones are, not as initialised: decisions vary by token
        for gate in model.halting.modules():
            if isinstance(gate, torch.nn.Linear):
                torch.nn.init.normal_(gate.weight, std=1.0 / gate.in_features**0.5)
    return model.to(args.device).eval()


def random_ids(args: argparse.Namespace, B: int, T: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed)).to(args.device)


# Checks ---------------------------------------------------------------------------------


def check_precision(args: argparse.Namespace) -> dict:
    rows, ok = [], True
    for dtype in (torch.float32, torch.bfloat16):
        for halting in ("fixed_prune", "mlp_gate"):
            model = model_for(args, halting).to(dtype=dtype)
            ids = random_ids(args, args.batch, args.seq_len, model.config.vocab_size)
            with torch.no_grad():
                depth = model(ids, execution="dense").depth.float().mean().item()
            seen = compare_executions(model, ids)
            held = all(a.within(TOLERANCES[dtype]) for a in seen.values())
            ok &= held
            rows.append(
                {"dtype": str(dtype).removeprefix("torch."), "halting": halting, "mean_depth": depth, "within": held}
                | {name: a.as_dict() for name, a in seen.items()}
            )
    tolerances = {str(k).removeprefix("torch."): vars(v) for k, v in TOLERANCES.items()}
    return {"ok": ok, "tolerances": tolerances, "rows": rows}


def check_compile_dense(args: argparse.Namespace) -> dict:
    eager = model_for(args, "mlp_gate").train()
    explanation = torch._dynamo.explain(run_dense)(
        eager, random_ids(args, args.batch, args.seq_len, eager.config.vocab_size), torch.tensor(5, device=args.device)
    )
    torch._dynamo.reset()
    compiled = zoo.compile(model_for(args, "mlp_gate").train())
    ids = random_ids(args, args.batch, args.seq_len, eager.config.vocab_size, seed=1)
    step = torch.tensor(5, device=args.device)
    results, seconds = [], None
    for model in (eager, compiled):
        sync(args.device)
        start = time.perf_counter()
        out = model(ids, execution="dense", step=step)
        loss = out.logits.float().logsumexp(-1).mean() + out.aux_loss
        loss.backward()
        sync(args.device)
        seconds = time.perf_counter() - start  # the compiled run's: compile included
        results.append(out)
    scale = results[0].logits.abs().max().item()
    logit_diff = (results[1].logits - results[0].logits).abs().max().item() / scale
    grad_diff = max(
        ((q.grad - p.grad).abs().max() / p.grad.abs().max().clamp_min(1e-30)).item()
        for p, q in zip(eager.parameters(), compiled.parameters())
        if p.grad is not None
    )
    same_depth = torch.equal(results[0].depth, results[1].depth)
    ok = explanation.graph_break_count == 0 and same_depth and logit_diff < 1e-4 and grad_diff < 1e-3
    return {
        "ok": ok,
        "graph_breaks": explanation.graph_break_count,
        "graphs": explanation.graph_count,
        "same_depth": same_depth,
        "logit_diff_relative": logit_diff,
        "grad_diff_relative": grad_diff,
        "first_compiled_step_seconds": seconds,
    }


def check_decode_recompiles(args: argparse.Namespace) -> dict:
    frames, depth = {}, None
    steps = (2, 20 if args.smoke else 200)
    for n in steps:
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("inductor")
        model = zoo.compile(model_for(args, "mlp_gate"), backend=counter)
        prompt = random_ids(args, args.decode_batch, 16, model.config.vocab_size)
        depth = model.generate(prompt, n, output_logits=False, progress=False).depth
        frames[n] = counter.frame_count
    distinct = len({tuple(column) for column in depth.T.tolist()})
    return {
        "ok": frames[steps[0]] == frames[steps[1]],
        "frames": {str(n): f for n, f in frames.items()},
        "distinct_step_depths": distinct,
        "mean_depth": depth.float().mean().item(),
    }


class HostReads(TorchDispatchMode):
    """Counts the operations that make the host wait for the device, and the library lines
    that call them, whichever device the tensors are on (so the CPU counts what CUDA would wait for).

    Counted: reading a value (``.item()``, ``bool()``, ``int()`` of a tensor), ``.tolist()``,
    copies to the CPU, and the operations whose output size depends on the values
    (``nonzero``, ``masked_select``, indexing with a boolean mask).
    """

    SIZED_BY_VALUES = ("nonzero", "masked_select", "unique")

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.sites: collections.Counter[str] = collections.Counter()
        self._tolist = torch.Tensor.tolist

    def __enter__(self):
        reads, tolist = self, self._tolist

        def counted_tolist(tensor):
            reads.record()
            with torch._C.DisableTorchFunction():
                return tolist(tensor)

        torch.Tensor.tolist = counted_tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def record(self) -> None:
        self.count += 1
        paths = [(f.filename.replace("\\", "/"), f.lineno) for f in traceback.extract_stack()]
        ours = [(path, line) for path, line in paths if "/zoo/" in path]
        if ours:
            path, line = ours[-1]
            self.sites[f"zoo/{path.split('/zoo/')[-1]}:{line}"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if func is torch.ops.aten._local_scalar_dense.default or name in self.SIZED_BY_VALUES:
            self.record()
        elif name == "_to_copy" and args[0].device.type != "cpu" and str(kwargs.get("device", "")) == "cpu":
            self.record()
        elif name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ())
        ):
            self.record()
        return func(*args, **kwargs)


def check_host_syncs(args: argparse.Namespace) -> dict:
    model = model_for(args, "mlp_gate")
    prompt = random_ids(args, args.decode_batch, 16, model.config.vocab_size)
    short, long = 1, 21
    counts, sites = {}, None
    for n in (short, long):
        with HostReads() as reads:
            model.generate(prompt, n, output_logits=False, progress=False)
        counts[n], sites = reads.count, reads.sites
    per_step = (counts[long] - counts[short]) / (long - short)
    return {
        "ok": True,  # a measurement: the target (none per pass) is reported beside it
        "per_decode_step": per_step,
        "per_pass": per_step / model.config.passes,
        "sites": dict(sites.most_common(10)),
    }


def check_cuda_graphs(args: argparse.Namespace) -> dict:
    new = 16 if args.smoke else 128
    out: dict[str, Any] = {"ok": True, "new_tokens": new, "batch": args.decode_batch}
    generators: dict[str, Callable[[], Any]] = {}
    for mode in ("default", "reduce-overhead"):
        torch._dynamo.reset()
        try:
            options = {} if mode == "default" else {"mode": mode}
            model = zoo.compile(model_for(args, "fixed_prune"), **options)
            prompt = random_ids(args, args.decode_batch, 64, model.config.vocab_size)
            run = lambda model=model, prompt=prompt: model.generate(prompt, new, output_logits=False, progress=False)  # noqa: E731
            run()  # compiles
            generators[mode] = run
        except Exception as err:  # recorded: the figure for this mode is missing, not the run
            out["ok"] = False
            out[f"{mode}_error"] = f"{type(err).__name__}: {err}"[:2000]
    times: dict[str, list[float]] = {mode: [] for mode in generators}
    for repeat in range(3):
        for mode in list(generators)[:: 1 if repeat % 2 == 0 else -1]:
            sync(args.device)
            start = time.perf_counter()
            generators[mode]()
            sync(args.device)
            times[mode].append(time.perf_counter() - start)
    for mode, ts in times.items():
        out[f"{mode}_tokens_per_s"] = args.decode_batch * new / statistics.median(ts)
    if len(times) == 2:
        out["reduce_overhead_over_default"] = out["reduce-overhead_tokens_per_s"] / out["default_tokens_per_s"]
    return out


RUNNERS = {
    "precision": check_precision,
    "compile_dense": check_compile_dense,
    "decode_recompiles": check_decode_recompiles,
    "host_syncs": check_host_syncs,
    "cuda_graphs": check_cuda_graphs,
}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result: dict[str, Any] = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "torch": torch.__version__,
        "machine": platform.machine(),
        "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
    }
    for name in args.only.split(","):
        start = time.perf_counter()
        try:
            result[name] = RUNNERS[name](args)
        except Exception as err:  # one failing check must not lose the others' figures
            result[name] = {"ok": False, "error": f"{type(err).__name__}: {err}"[:2000]}
            traceback.print_exc()
        result[name]["seconds"] = time.perf_counter() - start
        print(f"{name}: {'ok' if result[name]['ok'] else 'FAILED'} ({result[name]['seconds']:.1f} s)", flush=True)
        with atomic_write(args.out) as tmp:  # after every check: a run stopped at its time limit keeps the rest
            tmp.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    sys.exit(0 if all(v.get("ok", True) for v in main().values() if isinstance(v, dict) and "ok" in v) else 1)
