"""The lm-eval adapter against direct computation with the model, and simple_evaluate on a local task."""

from __future__ import annotations

import json
import math

import lm_eval
import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.tasks import TaskManager

import zoo
from zoo.checkpoint import save
from zoo.data import ByteTokenizer
from zoo.lm_eval_adapter import PonderZooLM

TOK = ByteTokenizer()
EOT = TOK.eos_token_id

QUESTIONS = [
    {
        "question": "The assert statement is",
        "choices": [" a way to insert debugging checks", " a fruit", " blue"],
        "answer": 0,
    },
    {"question": "def f(x):\n    return", "choices": [" x", " banana split", " 42 ** 2"], "answer": 1},
    {"question": "Exceptions are raised with", "choices": [" raise", " lift", " elevate"], "answer": 0},
    {
        "question": "A for loop iterates over",
        "choices": [" an iterable", " nothing at all", " q"],
        "answer": 2,
    },
]


@pytest.fixture(scope="module")
def model() -> zoo.RecurrentLM:
    torch.manual_seed(0)
    # Gates that halt some tokens, so scoring goes through real adaptive depth.
    model = zoo.build("adaponder-pythia-tiny", max_seq_len=64)
    with torch.no_grad():
        for gate in model.halting.gates:
            gate[2].bias.fill_(-9.0)
            gate[2].weight.mul_(40.0)
    return model.eval()


def direct_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[t + 1] | ids[: t + 1]) for every t, from one forward."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).logits[0].float()
    return F.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)


def request(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_registered_under_ponder_zoo():
    assert get_model("ponder-zoo") is PonderZooLM


def test_model_halts_some_tokens(model):
    depth = model(torch.tensor([TOK.encode("The try statement specifies exception handlers")])).depth
    assert depth.min() < 4 < depth.max() + 1


def test_loglikelihood_equals_direct_computation(model):
    lm = PonderZooLM(model=model, tokenizer=TOK, batch_size=3)
    pairs = [("The try statement", " specifies"), ("x = ", "1"), ("", "empty context"), ("a" * 200, " long")]
    results = lm.loglikelihood([request("loglikelihood", c, x) for c, x in pairs])
    for (context, continuation), (score, greedy) in zip(pairs, results):
        # lm-eval moves the context's trailing spaces to the continuation ("x =", " 1") and
        # conditions an empty context on the end-of-text token.
        spaces = context[len(context.rstrip()) :]
        ctx = TOK.encode(context.rstrip()) or [EOT]
        cont = TOK.encode(spaces + continuation)
        whole = (ctx + cont)[-(64 + 1) :]  # longer inputs keep their last max_length + 1 tokens
        expected = direct_logprobs(model, whole)[-len(cont) :].sum()
        assert score == pytest.approx(float(expected), abs=1e-4)
        assert greedy is False
    assert results[0] != results[1]


def test_greedy_flag(model):
    lm = PonderZooLM(model=model, tokenizer=TOK)
    ids = TOK.encode("Exceptions are")
    for _ in range(3):  # the greedy continuation, one full forward per token
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    greedy = ids[-3:]
    other = [(greedy[0] + 1) % 256, *greedy[1:]]
    (_, is_greedy), (_, not_greedy) = lm._loglikelihood_tokens(
        [(None, ids[:-3], greedy), (None, ids[:-3], other)]
    )
    assert is_greedy is True and not_greedy is False


def test_loglikelihood_rolling_predicts_each_token_once(model):
    text = "The with statement wraps a block with methods."  # 46 bytes: 3 windows of 16
    tokens = TOK.encode(text)
    whole = [EOT] + tokens
    # Fits the context: one window, every token conditioned on everything before it.
    (score,) = PonderZooLM(model=model, tokenizer=TOK).loglikelihood_rolling(
        [request("loglikelihood_rolling", text)]
    )
    assert score == pytest.approx(float(direct_logprobs(model, whole).sum()), abs=1e-3)
    # Longer than max_length = 16: windows of 16 predictions, each with a full 16-token input
    # (the last window's input reaches back into tokens already predicted).
    L = 16
    (rolled,) = PonderZooLM(model=model, tokenizer=TOK, max_length=L).loglikelihood_rolling(
        [request("loglikelihood_rolling", text)]
    )
    expected = 0.0
    for start in range(0, len(tokens), L):
        end = min(start + L, len(tokens))  # predict tokens[start:end]
        window = whole[max(end - L, 0) : end + 1]  # inputs whole[end-L:end], targets shifted by one
        expected += float(direct_logprobs(model, window)[-(end - start) :].sum())
    assert rolled == pytest.approx(expected, abs=1e-3)
    assert rolled != pytest.approx(score, abs=1e-3)  # a shorter context changes the scores


def test_generate_until_is_greedy_and_stops_at_the_stop_string(model):
    lm = PonderZooLM(model=model, tokenizer=TOK)
    prompt = "The if statement"
    ids = TOK.encode(prompt)
    for _ in range(12):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    greedy = TOK.decode(ids[len(TOK.encode(prompt)) :])
    (full,) = lm.generate_until([request("generate_until", prompt, {"until": [], "max_gen_toks": 12})])
    assert full == greedy
    stop = greedy[4:6]
    (cut,) = lm.generate_until([request("generate_until", prompt, {"until": [stop], "max_gen_toks": 12})])
    assert cut == greedy[: greedy.index(stop)]


def write_task(folder) -> None:
    data = folder / "questions.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (folder / "zoo_tiny_mc.yaml").write_text(
        "task: zoo_tiny_mc\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {data}\n"
        f"  cache_dir: {folder / 'hf_cache'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )


def expected_accuracy(model) -> float:
    right = 0
    for q in QUESTIONS:
        scores = []
        for choice in q["choices"]:
            ctx, cont = TOK.encode(q["question"]), TOK.encode(choice)
            scores.append(float(direct_logprobs(model, ctx + cont)[-len(cont) :].sum()))
        right += int(max(range(len(scores)), key=scores.__getitem__) == q["answer"])
    return right / len(QUESTIONS)


@pytest.mark.slow
def test_simple_evaluate_on_a_local_task(model, tmp_path):
    write_task(tmp_path)
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    lm = PonderZooLM(model=model, tokenizer=TOK)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=["zoo_tiny_mc"], task_manager=manager, bootstrap_iters=0
    )
    acc = results["results"]["zoo_tiny_mc"]["acc,none"]
    assert acc == pytest.approx(expected_accuracy(model))
    assert 0.0 < acc < 1.0  # the task separates right from wrong, so the comparison can fail

    # By name, from a saved checkpoint, as the lm_eval command line would.
    save(model, tmp_path / "ckpt")
    by_name = lm_eval.simple_evaluate(
        model="ponder-zoo",
        model_args={"pretrained": str(tmp_path / "ckpt"), "tokenizer": "byte"},
        tasks=["zoo_tiny_mc"],
        task_manager=manager,
        bootstrap_iters=0,
    )
    assert by_name["results"]["zoo_tiny_mc"]["acc,none"] == acc
    assert not math.isnan(acc)


# model_args are checked at construction ----------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"batch_size": -1}, "batch_size must be a positive integer, 'auto' or 'auto:N', got -1"),
        ({"batch_size": 0}, "got 0"),
        ({"batch_size": "auto:0"}, "batch_size='auto:0': use a positive integer, 'auto', or 'auto:N'"),
        ({"batch_size": "auto:x"}, "'auto:N' with N a positive integer"),
        ({"batch_size": "eight"}, "got 'eight'"),
        ({"batch_size": True}, "got True"),
        ({"max_length": -5}, "max_length must be a positive integer, got -5"),
        ({"max_length": 65}, "max_length=65 exceeds the model's max_seq_len=64"),
        ({"max_batch_size": 0}, "max_batch_size must be a positive integer"),
        ({"execution": "fast"}, "execution must be 'dense', 'sparse' or None"),
        ({"device": "gpu0"}, "device='gpu0' is not a torch device"),
    ],
)
def test_bad_model_args_fail_at_construction(model, kwargs, needle):
    with pytest.raises(ValueError) as err:
        PonderZooLM(model=model, tokenizer=TOK, **kwargs)
    assert needle in str(err.value)


def test_sparse_execution_of_a_recompute_model_fails_at_construction():
    recompute = zoo.build("ponder-pythia-tiny", max_seq_len=64)
    with pytest.raises(ValueError, match="cache='kv_reuse'"):
        PonderZooLM(model=recompute, tokenizer=TOK, execution="sparse")


def test_a_folder_without_tokenizer_is_refused(model, tmp_path):
    save(model, tmp_path / "ckpt")  # zoo.save stores no tokenizer
    with pytest.raises(ValueError, match="names no tokenizer"):
        PonderZooLM(pretrained=str(tmp_path / "ckpt"))
    with pytest.raises(ValueError, match="not both"):
        PonderZooLM(model=model, pretrained=str(tmp_path / "ckpt"), tokenizer=TOK)


@pytest.mark.parametrize("batch_size", ["auto", "auto:4", "2", 1])
def test_lm_eval_batch_size_forms_give_the_same_scores(model, batch_size):
    pairs = [("The try statement", " specifies"), ("x = ", "1"), ("", "empty context"), ("a" * 40, " long")]
    pairs = pairs * 2
    reference = PonderZooLM(model=model, tokenizer=TOK, batch_size=8).loglikelihood(
        [request("loglikelihood", c, x) for c, x in pairs]
    )
    lm = PonderZooLM(model=model, tokenizer=TOK, batch_size=batch_size, max_batch_size=4)
    scores = lm.loglikelihood([request("loglikelihood", c, x) for c, x in pairs])
    assert [s for s, _ in scores] == pytest.approx([s for s, _ in reference], abs=1e-4)
    assert [g for _, g in scores] == [g for _, g in reference]
    if str(batch_size).startswith("auto"):
        assert lm.batch_size == batch_size and set(lm.batch_sizes.values()) == {4}  # all fit: the maximum
        # auto:4 detects again at each quarter of the requests a batch starts in (8 requests, batches of 4)
        assert sorted(lm.batch_sizes) == ([0, 2] if batch_size == "auto:4" else [0])


def test_auto_batch_size_halves_on_out_of_memory(model, monkeypatch):
    lm = PonderZooLM(model=model, tokenizer=TOK, batch_size="auto", max_batch_size=16)
    real = lm.model.forward

    def limited(ids, *args, **kwargs):  # a device that holds at most 5 rows
        if ids.shape[0] > 5:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(ids, *args, **kwargs)

    monkeypatch.setattr(lm.model, "forward", limited)
    assert lm._largest_batch(32) == 4
    monkeypatch.setattr(lm.model, "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("shape bug")))
    with pytest.raises(RuntimeError, match="shape bug"):  # other errors are not taken for memory
        lm._largest_batch(32)


def test_lm_eval_command_line_model_args_string(model, tmp_path):
    save(model, tmp_path / "ckpt")
    args = f"pretrained={tmp_path / 'ckpt'},tokenizer=byte,max_length=32"
    extra = {"batch_size": "auto:2", "max_batch_size": None, "device": None}  # what lm_eval's CLI adds
    lm = PonderZooLM.create_from_arg_string(args, extra)
    assert (lm.max_length, lm.batch_size) == (32, "auto:2")
    with pytest.raises(ValueError, match="max_length must be a positive integer, got -5"):
        PonderZooLM.create_from_arg_string(f"pretrained={tmp_path / 'ckpt'},tokenizer=byte,max_length=-5")
