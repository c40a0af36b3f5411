"""The ``ponder-zoo`` console script and the pieces the recipes share (zoo/cli.py, zoo/recipes/common.py)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import zoo
import zoo.cli
from zoo.checkpoint import load_trained
from zoo.cli import COMMANDS, build_parser
from zoo.data import load_tokenizer
from zoo.recipes.common import HelpFormatter, add_settings, attribute_help, settings_from

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--override", "dim=32", "--override", "num_layers=1", "--override", "num_heads=2"]


def ponder_zoo(*args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Runs the installed console script (``python -m zoo.cli`` where it is not on PATH)."""
    script = Path(sys.executable).parent / "ponder-zoo"
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "zoo.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    result = subprocess.run(
        [*command, *args], capture_output=True, text=True, cwd=cwd or ROOT, env=env, timeout=300
    )
    if check and result.returncode != 0:
        raise AssertionError(f"ponder-zoo {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


@dataclass(frozen=True)
class Example:
    """Settings of a test.

    Attributes:
        steps: optimizer steps, over
            two lines.
        lr: peak learning rate (1% of ``x``).
        name: a name.
        top_k: the k most likely (None: all).
        flag: a switch.
        table: not a scalar, so no option.
    """

    steps: int = 10
    lr: float = 1e-3
    name: str = "a"
    top_k: int | None = None
    flag: bool = False
    table: dict = None  # type: ignore[assignment]


def test_settings_become_options_with_defaults_and_help_and_come_back():
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
    assert add_settings(parser, Example()) == ["steps", "lr", "name", "top_k", "flag"]
    text = parser.format_help()
    assert "optimizer steps, over two lines (default: 10)" in " ".join(text.split())
    assert "peak learning rate (1% of x) (default: 0.001)" in " ".join(text.split())
    args = parser.parse_args(["--steps", "3", "--top-k", "5", "--flag"])
    assert settings_from(args, Example()) == Example(steps=3, top_k=5, flag=True)
    assert settings_from(parser.parse_args(["--top-k", "none"]), Example(top_k=4)) == Example()
    with pytest.raises(SystemExit):
        parser.parse_args(["--steps", "1.5"])  # argparse: invalid int value
    assert attribute_help(Example)["top_k"] == "the k most likely (None: all)"


def test_settings_from_a_class_default_to_none_meaning_elsewhere():
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
    add_settings(parser, Example, only=("steps", "lr"), unset="the size's setting")
    assert "(default: the size's setting)" in parser.format_help()
    args = parser.parse_args(["--lr", "0.5"])
    assert settings_from(args, Example(steps=7), unset=True) == Example(steps=7, lr=0.5)
    with pytest.raises(TypeError, match="table is not an int"):
        add_settings(argparse.ArgumentParser(), Example, only=("table",))


def test_every_command_is_listed_and_its_help_shows_the_defaults(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    top = capsys.readouterr().out
    assert all(name in top for name in COMMANDS)
    expected = {
        "train": ["--steps", "(default: adaponder-pythia-tiny)", "--precision", "--plugin"],
        "continue": ["--gate-steps", "--gate-lr X", "(default: 0.001)", "--plugin"],
        "evaluate": ["--max-windows", "--tasks-batch-size N", "(default: 8)", "--plugin"],
        "generate": ["--max-new-tokens N", "(default: 200)", "--plugin"],
        "iso-flops": ["--stage1 X", "(default: 0.3)", "--plugin"],
        "demo": ["--workers N", "(default: runs/demo)", "--plugin"],
        "convert": ["--to {auto,hf,zoo}", "(default: auto)", "--plugin"],
    }
    for name, pieces in expected.items():
        if name == "demo":  # the demo runs the library's own parts only
            pieces = pieces[:-1]
        with pytest.raises(SystemExit):
            parser.parse_args([name, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert all(piece in text for piece in pieces), (name, [p for p in pieces if p not in text])


def test_plain_override_values_are_accepted_and_a_bad_one_names_the_key(tmp_path):
    from zoo.recipes import pretrain

    args = pretrain.build_parser().parse_args(
        ["--steps", "4", "--out", str(tmp_path), "--override", "halting=act", "--override", "dim=32"]
    )
    config = pretrain.model_config(args, pretrain.SETTINGS["tiny"])
    assert (config.halting, config.dim) == ("act", 32)
    bad = ponder_zoo(
        "train", "--steps", "2", "--out", str(tmp_path / "bad"), "--override", "dimm=3", check=False
    )
    assert bad.returncode != 0 and "dimm" in bad.stderr and not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_train_then_evaluate_generate_and_convert_through_the_console_script(tmp_path):
    run = tmp_path / "run"
    trained = ponder_zoo(
        "train", "--steps", "4", "--batch-size", "4", "--seq-len", "32", "--eval-windows", "2",
        "--no-progress", "--device", "cpu", "--out", str(run), "--override", "halting=act", *TINY,
    )
    assert "perplexity" in trained.stdout and (run / "eval.json").is_file()
    assert json.loads((run / "run.json").read_text())["model_config"]["halting"] == "act"

    ponder_zoo("evaluate", "--model", str(run), "--max-windows", "2", "--out", str(tmp_path / "eval"))
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert set(report) == {"model", "full_depth"} and report["model"]["tokens"] == 2 * 32

    ponder_zoo("generate", "--model", str(run), "--prompt", "def ", "--max-new-tokens", "5",
               "--json", str(tmp_path / "gen.json"))
    generated = json.loads((tmp_path / "gen.json").read_text())
    model, tokenizer = load_trained(run)
    ids = torch.tensor([load_tokenizer(tokenizer).encode("def ")])
    assert generated["tokens"] == model.eval().generate(ids, max_new_tokens=5).tokens[0, 4:].tolist()

    # A zoo checkpoint to transformers (remote code: an ACT model) and back: the same logits.
    hf = tmp_path / "hf"
    assert "Hugging Face folder" in ponder_zoo("convert", str(run), str(hf)).stdout
    assert (hf / "modeling_ponder_zoo.py").is_file()
    back = tmp_path / "back"
    ponder_zoo("convert", str(hf), str(back))
    again = zoo.load(back)
    x = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, model(x).logits, rtol=0, atol=0)
    refused = ponder_zoo("convert", str(run), str(tmp_path / "x"), "--override", "passes=2", check=False)
    assert refused.returncode != 0 and "--to zoo" in refused.stderr


def test_recipe_scripts_run_the_installed_recipes():
    for name in ("pretrain", "continue", "evaluate", "generate", "iso_flops", "demo"):
        result = subprocess.run(
            [sys.executable, str(ROOT / "recipes" / f"{name}.py"), "--help"],
            capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"},
        )
        assert result.returncode == 0 and "(default:" in result.stdout, (name, result.stderr)


def test_console_script_is_installed():
    from importlib.metadata import entry_points

    (script,) = entry_points(group="console_scripts", name="ponder-zoo")
    assert script.value == "zoo.cli:main" and script.load() is zoo.cli.main


def test_evaluation_generation_and_conversion_open_models_without_the_trainer(tmp_path):
    script = f"""
import sys
import zoo, zoo.analysis, zoo.iso_flops, zoo.lm_eval_adapter
from zoo.recipes import convert, evaluate, generate
model = zoo.build_model(zoo.preset("ponder-pythia-tiny", dim=32, num_layers=1, num_heads=2))
zoo.save(model, r"{tmp_path / 'ckpt'}")
assert generate.main(["--model", r"{tmp_path / 'ckpt'}", "--tokenizer", "byte", "--max-new-tokens", "3"]) == 0
assert evaluate.main(["--model", r"{tmp_path / 'ckpt'}", "--tokenizer", "byte", "--max-windows", "1",
                      "--seq-len", "16", "--no-full-depth", "--out", r"{tmp_path / 'eval'}"]) == 0
assert convert.main([r"{tmp_path / 'ckpt'}", r"{tmp_path / 'hf'}"]) == 0
print(sorted(name for name in sys.modules if name.startswith("zoo.train")))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
