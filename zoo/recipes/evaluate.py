"""Evaluation: perplexity, depth, compute, NLL by depth, plots, and lm-eval tasks.

::

    ponder-zoo evaluate --model runs/demo
    python recipes/evaluate.py --model runs/demo
    python recipes/evaluate.py --model runs/adaponder-70m --data /data/pile_val.bin --seq-len 2048 \\
        --tasks lambada_openai,piqa --limit 500

``--model`` is a training run folder (its latest checkpoint), a checkpoint, a ``zoo.save``
folder or a Hugging Face GPT-NeoX folder. Prints, for the model and for the same weights
at full depth (every token runs every pass): validation perplexity, mean depth, the share
of tokens running each pass, compute relative to full-depth PonderLM and to the one-pass
model (zoo/flops.py), and the mean NLL of the tokens by the depth they ran. Writes
``<out>/eval.json``, ``<out>/token_depth.png`` (per-token depth over a text sample) and
``<out>/depth_nll.png`` (NLL against depth). With ``--tasks``, runs lm-eval through
``lm_eval.simple_evaluate`` with the ``ponder-zoo`` adapter, prints its table and writes
``<out>/lm_eval.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from zoo.analysis import (
    depth_sample,
    evaluate,
    format_report,
    full_depth_copy,
    plot_depth_vs_nll,
    plot_token_depth,
)
from zoo.checkpoint import load_trained
from zoo.data import load_corpus, resolve_tokenizer
from zoo.recipes.common import HelpFormatter, add_plugin_option, add_settings
from zoo.registry import import_plugins


@dataclass(frozen=True)
class EvalSettings:
    """Defaults of an evaluation.

    Attributes:
        max_windows: validation windows (None: the whole validation stream).
        batch_size: windows per forward.
        sample_chars: characters of validation text in the per-token depth plot.
        tasks_batch_size: lm-eval requests per forward.
    """

    max_windows: int | None = None
    batch_size: int = 8
    sample_chars: int = 600
    tasks_batch_size: int = 8


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The options of ``ponder-zoo evaluate`` and ``recipes/evaluate.py``, with their defaults."""
    p = parser or argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--model", required=True, help="run folder, checkpoint, zoo.save folder or Hugging Face folder"
    )
    p.add_argument(
        "--out", default=None, help="where to write eval.json and the plots (default: <model>/eval)"
    )
    p.add_argument(
        "--data",
        default="embedded",
        help="'embedded', a pre-tokenized .bin, or text/jsonl files (its validation part is used)",
    )
    p.add_argument("--val-data", default=None, help="an explicit validation source (used as is)")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="'byte' or a tokenizer.json; default: the one the run or folder names (required otherwise)",
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="tokens per window; default: the run's training length or max_seq_len",
    )
    add_settings(p, EvalSettings())
    p.add_argument(
        "--execution", default=None, choices=["dense", "sparse"], help="default: sparse for kv_reuse models"
    )
    p.add_argument(
        "--sample-text", default=None, help="text for the per-token depth plot (default: validation text)"
    )
    p.add_argument("--no-full-depth", action="store_true", help="skip the full-depth comparison")
    p.add_argument("--tasks", default=None, help="comma-separated lm-eval task names")
    p.add_argument("--include-path", default=None, help="a folder of extra lm-eval task YAMLs")
    p.add_argument("--num-fewshot", type=int, default=None, help="lm-eval few-shot examples")
    p.add_argument("--limit", type=float, default=None, help="lm-eval examples per task (or a fraction)")
    p.add_argument("--device", default="cpu", help="where to run (cpu, cuda)")
    add_plugin_option(p)
    return p


# Build ---------------------------------------------------------------------------------------


def open_model(args: argparse.Namespace):
    """The model (eval mode), its tokenizer and the window length to evaluate with."""
    model, named = load_trained(args.model, device=args.device)
    tokenizer = resolve_tokenizer(args.tokenizer, named, model.config.vocab_size, args.model)
    seq_len = args.seq_len
    info = Path(args.model) / "run.json"
    if seq_len is None and info.is_file():
        seq_len = json.loads(info.read_text()).get("train", {}).get("seq_len")
    return model.eval(), tokenizer, min(seq_len or model.config.max_seq_len, model.config.max_seq_len)


# Evaluate ------------------------------------------------------------------------------------


def perplexity_and_depth(args, model, tokenizer, seq_len, out: Path) -> dict:
    """Evaluates the model and its full-depth copy, prints the reports, writes the plots."""
    _, val = load_corpus(args.data, tokenizer, val_data=args.val_data)
    results = {}
    models = (
        {"model": model}
        if args.no_full_depth or model.config.passes == 1
        else {"model": model, "full_depth": full_depth_copy(model)}
    )
    for name, m in models.items():
        report = evaluate(
            m,
            val,
            seq_len,
            batch_size=args.batch_size,
            max_windows=args.max_windows,
            execution=args.execution,
        )
        print(format_report(name, report))
        results[name] = report.to_dict()
        if name == "model":
            plot_depth_vs_nll(report, out / "depth_nll.png", title=f"{Path(args.model).name}: NLL by depth")
    text = (
        args.sample_text
        or tokenizer.decode(val.tokens[: 4 * args.sample_chars])[: args.sample_chars]
    )
    pieces, depth, _ = depth_sample(model, tokenizer, text, execution=args.execution)
    plot_token_depth(pieces, depth, model.config.passes, out / "token_depth.png", title="passes per token")
    print(f"wrote {out / 'eval.json'}, {out / 'token_depth.png'}, {out / 'depth_nll.png'}")
    return results


def run_tasks(args, model, tokenizer, out: Path) -> dict:
    """Runs ``--tasks`` through ``lm_eval.simple_evaluate`` with the ``ponder-zoo`` adapter."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    from zoo.lm_eval_adapter import PonderZooLM

    lm = PonderZooLM(
        model=model, tokenizer=tokenizer, batch_size=args.tasks_batch_size, execution=args.execution
    )
    names = args.tasks.split(",")
    manager = None
    if args.include_path:
        # Indexing lm-eval's own task folders takes seconds: skip it when the local ones suffice.
        manager = TaskManager(include_path=args.include_path, include_defaults=False)
        if not set(names) <= set(manager.all_tasks):
            manager = None
    manager = manager or TaskManager(include_path=args.include_path)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=names,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        task_manager=manager,
        log_samples=False,
        bootstrap_iters=0,
    )
    print(make_table(results))
    (out / "lm_eval.json").write_text(json.dumps(results["results"], indent=2, default=str))
    return results["results"]


# Main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Runs the evaluation; returns the exit status."""
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Runs the evaluation with parsed options; returns the exit status."""
    import_plugins(args.plugin)  # parts defined outside the library register now
    model, tokenizer, seq_len = open_model(args)
    out = Path(args.out or Path(args.model) / "eval")
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    print(
        f"{args.model}: {cfg.recurrence} x {cfg.passes} passes, halting {cfg.halting}, cache {cfg.cache}, "
        f"{model.num_parameters():,} parameters; windows of {seq_len} tokens"
    )
    results = perplexity_and_depth(args, model, tokenizer, seq_len, out)
    if args.tasks:
        results["lm_eval"] = run_tasks(args, model, tokenizer, out)
    (out / "eval.json").write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
