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

from zoo.data import Tokenizer, load_tokenizer
from zoo.model import RecurrentLM

__all__ = ["PonderZooLM"]


@register_model("ponder-zoo")
class PonderZooLM(TemplateLM):
    """lm-eval's model API (``loglikelihood``, ``loglikelihood_rolling``, ``generate_until``) for a zoo model.

    Args:
        model: a model object; or ``None`` with ``pretrained``.
        pretrained: a path :func:`zoo.train.load_trained` opens (a run folder, a checkpoint,
            a ``zoo.save`` folder or a Hugging Face folder), used when ``model`` is ``None``.
        tokenizer: a :class:`~zoo.data.Tokenizer` or its name (``"byte"``, a ``tokenizer.json``
            path); ``None`` takes the one the run or folder names.
        batch_size: sequences per forward when scoring.
        max_length: longest input; default the model's ``max_seq_len``.
        device: where to run (``"cpu"``, ``"cuda"``); default where the model is.
        execution: ``"dense"``, ``"sparse"`` or ``None`` (the model's choice in eval mode).
        max_batch_size: accepted for lm-eval's interface; unused.

    Raises:
        ValueError: neither ``model`` nor ``pretrained``, no tokenizer, or a tokenizer
            without an end-of-text token.
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
        if model is None:
            if pretrained is None:
                raise ValueError("PonderZooLM needs a model object or pretrained=<path>")
            from zoo.train import load_trained

            model, named = load_trained(pretrained)
            tokenizer = tokenizer if tokenizer is not None else named
        if tokenizer is None:
            raise ValueError("PonderZooLM needs a tokenizer: pass tokenizer='byte' or a tokenizer.json path")
        self.zoo_tokenizer = (
            load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
        )
        if self.zoo_tokenizer.eos_token_id is None:
            raise ValueError(
                f"tokenizer {self.zoo_tokenizer.name} has no end-of-text token, which lm-eval uses as the "
                f"context of empty prompts; use a tokenizer with one"
            )
        if device is not None:
            model = model.to(device)
        self.model = model.eval()
        self._device = next(model.parameters()).device
        self.batch_size = int(str(batch_size).split(":")[0]) if str(batch_size) != "auto" else 8
        self.max_length = int(max_length or model.config.max_seq_len)
        self.execution = execution

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
        for first in range(0, len(prepared), self.batch_size):
            chunk = prepared[first : first + self.batch_size]
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
            gen = self.model.generate(
                torch.tensor([ids], device=self._device),
                max_new_tokens=max_new,
                temperature=temperature,
                eos_token_id=self.eot_token_id,
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
