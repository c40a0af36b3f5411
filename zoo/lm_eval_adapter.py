"""A zoo model as an lm-evaluation-harness model, registered as ``ponder-zoo``.

::

    import lm_eval
    from zoo.lm_eval_adapter import PonderZooLM

    lm = PonderZooLM(model=model, tokenizer="byte")
    results = lm_eval.simple_evaluate(model=lm, tasks=["lambada_openai"])

    # or by name, as the lm_eval command line does:
    lm_eval.simple_evaluate(model="ponder-zoo", model_args={"pretrained": "runs/demo"}, tasks=[...])

The class follows lm-eval's ``TemplateLM``: lm-eval splits context and continuation
(moving trailing spaces of the context to the continuation) and an empty context is
replaced by the end-of-text token, as for Hugging Face models. Scores are the model's
next-token log-probabilities in its default execution (sparse for ``kv_reuse`` models in
eval mode), so halting is part of what is evaluated; generation uses
:meth:`~zoo.model.RecurrentLM.generate`.

Importing this module needs ``lm-eval`` (``pip install 'ponder-zoo[eval]'``).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from zoo.data import Tokenizer, resolve_tokenizer
from zoo.model import RecurrentLM

__all__ = ["PonderZooLM"]


@register_model("ponder-zoo")
class PonderZooLM(TemplateLM):
    """lm-eval's model API (``loglikelihood``, ``loglikelihood_rolling``, ``generate_until``) for a zoo model.

    Every argument is checked here, at construction, so a bad ``model_args`` string fails
    before the first request. Numbers may come as lm-eval's command line passes them
    (``"8"``); ``batch_size`` takes lm-eval's own forms: an integer, ``"auto"`` (the largest
    batch, from ``max_batch_size`` halving down, that runs a forward of the longest
    request without running out of memory) or ``"auto:N"`` (the same, detected again at
    ``N`` evenly spaced points of the requests, sorted longest first, as lm-eval's
    Hugging Face model does).

    Args:
        model: a model object; or ``None`` with ``pretrained``.
        pretrained: a path :func:`zoo.checkpoint.load_trained` opens (a run folder, a checkpoint,
            a ``zoo.save`` folder or a Hugging Face folder), used when ``model`` is ``None``.
        tokenizer: a :class:`~zoo.data.Tokenizer` or its name (``"byte"``, a ``tokenizer.json``
            path); ``None`` takes the one the run or folder names, and there is no default
            (:func:`zoo.data.resolve_tokenizer`).
        batch_size: sequences per forward when scoring: a positive integer, ``"auto"`` or
            ``"auto:N"``.
        max_length: longest input, at most the model's ``max_seq_len`` (the default).
        device: where to run (``"cpu"``, ``"cuda"``); default where the model is.
        execution: ``"dense"``, ``"sparse"`` or ``None`` (the model's choice in eval mode).
        max_batch_size: the largest batch ``"auto"`` tries (default 64).

    Raises:
        ValueError: neither or both of ``model`` and ``pretrained``, no tokenizer, a tokenizer
            without an end-of-text token, or an argument of the wrong type or range (named,
            with the valid forms).
    """

    def __init__(
        self,
        model: RecurrentLM | None = None,
        pretrained: str | os.PathLike | None = None,
        tokenizer: Tokenizer | str | None = None,
        batch_size: int | str = 8,
        max_length: int | None = None,
        device: str | None = None,
        execution: str | None = None,
        max_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        self._batch_size, self.batch_schedule = _parse_batch_size(batch_size)
        max_batch_size = 64 if max_batch_size is None else max_batch_size
        self.max_batch_size = _positive_int("max_batch_size", max_batch_size)
        if max_length is not None:
            max_length = _positive_int("max_length", max_length)
        if execution not in (None, "dense", "sparse"):
            raise ValueError(f"execution must be 'dense', 'sparse' or None, got {execution!r}")
        if device is not None:
            try:
                device = torch.device(device)
            except (RuntimeError, TypeError) as err:
                raise ValueError(
                    f"device={device!r} is not a torch device ({err}); use 'cpu' or 'cuda'"
                ) from None
        if (model is None) == (pretrained is None):
            raise ValueError("PonderZooLM needs a model object or pretrained=<path>, not both")
        named, source = None, "the model"
        if model is None:
            from zoo.checkpoint import load_trained

            model, named = load_trained(pretrained)
            source = str(pretrained)
        elif not isinstance(model, RecurrentLM):
            raise ValueError(f"model must be a zoo RecurrentLM, got {type(model).__name__}")
        if max_length is not None and max_length > model.config.max_seq_len:
            raise ValueError(
                f"max_length={max_length} exceeds the model's max_seq_len={model.config.max_seq_len}; "
                f"pass at most that, or leave it out"
            )
        model.resolve_execution(execution)  # e.g. sparse needs a freezing cache: refused now
        self.zoo_tokenizer = resolve_tokenizer(tokenizer, named, model.config.vocab_size, source)
        if self.zoo_tokenizer.eos_token_id is None:
            raise ValueError(
                f"tokenizer {self.zoo_tokenizer.name} has no end-of-text token, which lm-eval uses as the "
                f"context of empty prompts; use a tokenizer with one"
            )
        if device is not None:
            model = model.to(device)
        self.model = model.eval()
        self._device = next(model.parameters()).device
        self.max_length = max_length or model.config.max_seq_len
        self.execution = execution
        self.batch_sizes: dict[int, int] = {}  # schedule point -> detected size (batch_size "auto")

    @property
    def batch_size(self) -> int | str:
        """The fixed batch size, or ``"auto"`` / ``"auto:N"`` as given."""
        if self._batch_size is not None:
            return self._batch_size
        return "auto" if self.batch_schedule == 1 else f"auto:{self.batch_schedule}"

    # TemplateLM hooks ---------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        """The tokenizer's end-of-text id (the context of empty prompts)."""
        return int(self.zoo_tokenizer.eos_token_id)

    @property
    def tokenizer_name(self) -> str:
        """The tokenizer's name, which lm-eval uses to key its request cache."""
        return self.zoo_tokenizer.name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids of ``string`` (no special tokens are ever added)."""
        return self.zoo_tokenizer.encode(string)

    def tok_decode(self, tokens: list[int]) -> str:
        """Text of ``tokens``."""
        return self.zoo_tokenizer.decode(tokens)

    @torch.no_grad()
    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """Scores each (key, context ids, continuation ids): summed log-probability, greedy or not.

        Inputs longer than ``max_length + 1`` lose their oldest context tokens. Requests are
        run longest first in right-padded batches; causality makes the padding irrelevant.
        """
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        prepared = []
        for index, (_, context, continuation) in enumerate(requests):
            if not continuation:
                raise ValueError("lm-eval asked to score an empty continuation")
            whole = (list(context) + list(continuation))[-(self.max_length + 1) :]
            prepared.append((index, whole[:-1], whole[-len(continuation) :]))
        prepared.sort(key=lambda item: -len(item[1]))
        first = 0
        while first < len(prepared):
            size = self._batch_size or self._detected_batch_size(first, prepared)
            chunk = prepared[first : first + size]
            first += size
            width = len(chunk[0][1])
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            for row, (_, inputs, _) in enumerate(chunk):
                ids[row, : len(inputs)] = torch.tensor(inputs)
            logits = self.model(ids.to(self._device), execution=self.execution).logits.float()
            logp = F.log_softmax(logits, dim=-1)  # (B, T, V)
            for row, (index, inputs, targets) in enumerate(chunk):
                n = len(targets)
                scores = logp[row, len(inputs) - n : len(inputs)]  # (n, V): predictions of the targets
                target = torch.tensor(targets, device=scores.device)
                total = float(scores.gather(-1, target[:, None]).sum())
                greedy = bool((scores.argmax(-1) == target).all())
                results[index] = (total, greedy)
                key = requests[index][0]
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, (total, greedy))
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts, in windows of ``max_length`` tokens (lm-eval's
        rolling scheme: each token is predicted once, the first after the end-of-text token)."""
        out = []
        for request in requests:
            (text,) = request.args
            windows = [
                (None, *make_disjoint_window(pair))
                for pair in get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            total = sum(score for score, _ in self._loglikelihood_tokens(windows))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    @torch.no_grad()
    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, if ``temperature > 0``) continuations cut at the first stop string.

        Decoding itself stops at the first stop string or end-of-text token, and keeps no logits.

        Reads ``until`` (default: the end-of-text token's text), ``max_gen_toks`` (default
        256), ``temperature`` and ``do_sample`` from each request's generation arguments.
        """
        out = []
        for request in requests:
            context, gen_kwargs = request.args
            kwargs = dict(gen_kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", 256))
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
            ids = self.tok_encode(context)[-max(self.max_length - max_new, 1) :] or [self.eot_token_id]
            max_new = min(max_new, self.max_length - len(ids))
            stops = [stop for stop in until if stop]
            gen = self.model.generate(
                torch.tensor([ids], device=self._device),
                max_new_tokens=max_new,
                temperature=temperature,
                eos_token_id=self.eot_token_id,
                stop_strings=stops or None,  # decoding ends at the first stop string
                tokenizer=self.tok_decode if stops else None,
                output_logits=False,
                progress=False,
            )
            new = gen.tokens[0, len(ids) :].tolist()
            if self.eot_token_id in new:
                new = new[: new.index(self.eot_token_id)]
            text = self.tok_decode(new)
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out

    def _detected_batch_size(self, position: int, prepared: list) -> int:
        """``"auto"``: the batch size of the schedule point ``position`` falls in, detected once."""
        span = max(-(-len(prepared) // self.batch_schedule), 1)  # requests per schedule point
        point = position // span
        if point not in self.batch_sizes:
            width = max(len(prepared[point * span][1]), 1)
            self.batch_sizes[point] = self._largest_batch(width)
        return self.batch_sizes[point]

    @torch.no_grad()
    def _largest_batch(self, width: int) -> int:
        """The largest batch from ``max_batch_size`` halving down whose forward of ``width``
        tokens (and its log-softmax) fits in memory; 1 if none does."""
        size = self.max_batch_size
        while size > 1:
            try:
                ids = torch.zeros(size, width, dtype=torch.long, device=self._device)
                F.log_softmax(self.model(ids, execution=self.execution).logits.float(), dim=-1)
                return size
            except RuntimeError as err:  # torch.OutOfMemoryError is one
                if not _out_of_memory(err):
                    raise
                if self._device.type == "cuda":
                    torch.cuda.empty_cache()
                size //= 2
        return 1


def _out_of_memory(err: RuntimeError) -> bool:
    text = str(err).lower()
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return "out of memory" in text or "can't allocate memory" in text


def _positive_int(name: str, value: object) -> int:
    """``value`` as a positive int; lm-eval's command line may hand over ``"8"``."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _parse_batch_size(value: object) -> tuple[int | None, int]:
    """(fixed size or None for auto, schedule points): ``8``, ``"8"``, ``"auto"``, ``"auto:4"``."""
    if isinstance(value, str) and value.strip().startswith("auto"):
        head, sep, times = value.strip().partition(":")
        if head == "auto" and (not sep or (times.isdigit() and int(times) >= 1)):
            return None, int(times) if times else 1
        raise ValueError(
            f"batch_size={value!r}: use a positive integer, 'auto', or 'auto:N' with N a positive "
            f"integer (detect the batch size N times over the requests)"
        )
    try:
        return _positive_int("batch_size", value), 1
    except ValueError:
        raise ValueError(
            f"batch_size must be a positive integer, 'auto' or 'auto:N', got {value!r}"
        ) from None
