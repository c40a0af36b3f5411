"""The recipes under careless use: no data lost, nothing silent.

Each test runs a recipe the way a careless user would (a second run on a folder in use, a
model folder with no tokenizer, a malformed override, a resume after a divergence) and
checks that the run is refused before it writes anything, with a message that names the
value and the fix, and that what was there before is intact. The library-level guarantees
these rest on are tested in test_checkpoint.py, test_train.py, test_data.py,
test_lm_eval.py, test_inputs.py, test_registry_config.py and test_fuzz.py
(docs/reliability.md lists them).
"""

from __future__ import annotations

import json
import signal
import sys
import time

import numpy as np
import pytest

import zoo
from test_checkpoint import snapshot
from test_data import make_tokenizer_json
from test_recipes import ROOT, SMALL, recipe, spawned
from zoo.checkpoint import FolderBusyError
from zoo.train import latest_checkpoint, load_trained, read_metrics


@pytest.mark.slow
def test_a_second_pretrain_on_a_folder_in_use_is_refused_before_it_writes(tmp_path):
    out = tmp_path / "run"
    first = [sys.executable, str(ROOT / "recipes" / "pretrain.py"), "--steps", "100000", "--out", str(out)]
    with spawned([*first, "--checkpoint-every", "0", "--tokenizer", "byte", *SMALL]) as process:
        deadline = time.time() + 120
        while len(read_metrics(out)) < 2 and time.time() < deadline:
            time.sleep(0.2)
        info = (out / "run.json").read_bytes()
        other = make_tokenizer_json(tmp_path)
        for extra in ([], ["--resume"]):
            with pytest.raises(FolderBusyError, match="locked by another process that is training"):
                second = ["--steps", "8", "--out", str(out), "--tokenizer", other, *extra, *SMALL]
                recipe("pretrain").main(second)
        assert (out / "run.json").read_bytes() == info  # the running run's record is untouched
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err[-2000:]
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))  # one run's rows, in order
    assert load_trained(out)[1] == "byte"


def test_a_refused_pretrain_leaves_the_finished_run_as_it_was(tmp_path):
    out = tmp_path / "run"
    pretrain = recipe("pretrain")
    assert pretrain.main(["--steps", "4", "--out", str(out), "--eval-windows", "1", *SMALL]) == 0
    before = snapshot(out)
    other = make_tokenizer_json(tmp_path)
    with pytest.raises(ValueError, match="already holds a run"):
        pretrain.main(["--steps", "4", "--out", str(out), "--tokenizer", other, *SMALL])
    with pytest.raises(ValueError, match=r"in data, val_data, tokenizer \(.*; tokenizer: 'byte' ->"):
        pretrain.main(["--steps", "4", "--out", str(out), "--tokenizer", other, "--resume", *SMALL])
    assert snapshot(out) == before
    assert load_trained(out)[1] == "byte"


def test_pretrain_resumes_after_a_divergence_with_a_lower_learning_rate(tmp_path, monkeypatch, capsys):
    import zoo.train.loop

    real, calls = zoo.train.loop.lm_loss, {"n": 0}

    def failing(logits, targets):  # step 5 diverges
        calls["n"] += 1
        return real(logits, targets) * (float("nan") if calls["n"] == 9 else 1.0)

    out = tmp_path / "run"
    common = ["--steps", "8", "--checkpoint-every", "2", "--out", str(out), "--eval-windows", "1", *SMALL]
    monkeypatch.setattr(zoo.train.loop, "lm_loss", failing)
    assert recipe("pretrain").main(common) == 1
    advice = capsys.readouterr().err
    assert "loss is nan at step 5" in advice and "--resume --lr NEW --allow-change lr" in advice
    monkeypatch.setattr(zoo.train.loop, "lm_loss", real)
    with pytest.raises(ValueError, match=r"in lr \(lr: 0.003 -> 0.001\).*--allow-change lr"):
        recipe("pretrain").main([*common, "--resume", "--lr", "1e-3"])
    assert recipe("pretrain").main([*common, "--resume", "--lr", "1e-3", "--allow-change", "lr"]) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 9)) and rows[4]["lr"] < rows[3]["lr"] / 2
    assert json.loads((out / "run.json").read_text())["train"]["lr"] == 1e-3  # the record follows the change


def test_pretrain_overrides_and_pre_tokenized_data_are_checked_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    pretrain = recipe("pretrain")
    with pytest.raises(ValueError, match=r"'dim=abc': dim takes an integer \(e.g. dim=512\), not 'abc'"):
        pretrain.main(["--steps", "2", "--out", str(out), "--override", "dim=abc", *SMALL])
    with pytest.raises(ValueError, match="embed_scale takes a finite number"):
        pretrain.main(["--steps", "2", "--out", str(out), "--override", "embed_scale=inf", *SMALL])
    np.arange(5000, dtype=np.uint16).__mod__(256).astype(np.uint16).tofile(tmp_path / "d.bin")
    with pytest.raises(ValueError, match=r"pre-tokenized \(.bin\): pass --tokenizer"):
        pretrain.main(["--steps", "2", "--out", str(out), "--data", str(tmp_path / "d.bin"), *SMALL])
    assert not out.exists()
    # Plain values work: a string field takes its text, halting_kwargs its JSON.
    args = ["--steps", "2", "--out", str(out), "--eval-windows", "1", *SMALL]
    overrides = ["--override", "halting=fixed_prune", "--override", 'halting_kwargs={"ratio": 0.5}']
    assert pretrain.main([*args, *overrides]) == 0
    assert load_trained(out)[0].config.halting_kwargs == {"ratio": 0.5}


@pytest.mark.parametrize("name", ["generate", "evaluate", "continue"])
def test_reading_a_folder_without_a_tokenizer_is_refused(tmp_path, hf_neox_folder, name):
    _, folder = hf_neox_folder(vocab_size=400, max_position_embeddings=64)  # no tokenizer.json beside it
    out = str(tmp_path / "out")
    args = {
        "generate": ["--model", str(folder), "--max-new-tokens", "2"],
        "evaluate": ["--model", str(folder), "--out", out],
        "continue": ["--hf", str(folder), "--out", out, "--gate-steps", "1", "--steps", "1"],
    }[name]
    with pytest.raises(ValueError) as err:
        recipe(name).main(args)
    assert f"{folder} names no tokenizer" in str(err.value) and "--tokenizer" in str(err.value)
    assert not (tmp_path / "out").exists()
    if name == "generate":  # bytes only when asked: then it runs
        assert recipe(name).main([*args, "--tokenizer", "byte"]) == 0


def test_generate_refuses_sampling_options_that_greedy_decoding_would_ignore(tmp_path):
    folder = zoo.save(zoo.build("pythia-tiny"), tmp_path / "ckpt")
    with pytest.raises(ValueError, match="top_k=40 has no effect with temperature=0"):
        recipe("generate").main(["--model", str(folder), "--tokenizer", "byte", "--top-k", "40"])


def test_continue_resume_compares_the_stage_configuration(tmp_path, hf_neox_folder):
    _, folder = hf_neox_folder(vocab_size=400, max_position_embeddings=64)
    make_tokenizer_json(folder)
    out = tmp_path / "cont"
    base = ["--hf", str(folder), "--out", str(out), "--gate-steps", "2", "--steps", "2", "--lr", "1e-3"]
    base += ["--eval-windows", "1", *SMALL]
    assert recipe("continue").main([*base, "--checkpoint-every", "1"]) == 0
    stage1 = json.loads((out / "stage1" / "run.json").read_text())
    assert stage1["tokenizer"] == str(folder / "tokenizer.json") and stage1["stage"] == 1
    (latest_checkpoint(out / "stage2").parent / "latest").write_text("step-000001\n")  # as if stopped at 1
    with pytest.raises(ValueError, match=r"in lr \(lr: 0.001 -> 0.0005\)"):
        recipe("continue").main([*base, "--resume", "--lr", "5e-4"])
    assert recipe("continue").main([*base, "--resume", "--lr", "5e-4", "--allow-change", "lr"]) == 0
    assert [r["step"] for r in read_metrics(out / "stage2")] == [1, 2]
