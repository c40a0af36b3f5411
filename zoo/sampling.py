"""Choosing the next token: greedy decoding, temperature, top-k and nucleus sampling.

:func:`check_sampling` validates a generation's arguments once, before any work, and
refuses combinations that would be silently ignored or would fail halfway:

* ``top_k`` or ``top_p`` with ``temperature=0`` (greedy decoding takes the argmax and would
  ignore them): set a temperature (e.g. 1.0) or drop them;
* a temperature that is negative, NaN or infinite; any positive temperature works, however
  small (the logits are shifted by their maximum before the division, so a temperature of
  ``1e-30`` gives the greedy token instead of overflowing into NaN);
* an ``eos_token_id`` (or one of a list of them) that is a float, a bool, or outside the
  vocabulary;
* a seed that is not an integer in ``[0, 2**64)``.

Integer arguments may be Python or NumPy integers (``numpy.int64(3)`` is taken as ``3``);
bools are refused wherever a number is expected, since ``True`` is almost always a mistake
there.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Sampling", "check_sampling", "check_token_id", "sample_next"]


class Sampling(NamedTuple):
    """Checked sampling arguments, with NumPy scalars turned into Python numbers.

    Attributes:
        temperature: 0 for greedy decoding, else the sampling temperature.
        top_k: sample among the ``top_k`` most likely tokens (``None``: all).
        top_p: nucleus mass (``None``: off).
        eos_token_id: the id that ends a row, a tuple of such ids (from a list), or ``None``.
        seed: the sampler's seed (``None``: torch's global generator).
    """

    temperature: float
    top_k: int | None
    top_p: float | None
    eos_token_id: int | tuple[int, ...] | None
    seed: int | None


def _integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)  # numpy.bool_ is not Integral


def _real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_sampling(
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | tuple[int, ...] | None = None,
    seed: int | None = None,
    vocab_size: int | None = None,
) -> Sampling:
    """Checks a generation's sampling arguments together; returns them as Python numbers.

    Args:
        temperature: 0 (greedy) or a positive finite number.
        top_k: ``None`` or a positive integer; needs ``temperature > 0``.
        top_p: ``None`` or a number in ``(0, 1]``; needs ``temperature > 0``.
        eos_token_id: ``None``, an integer id in ``[0, vocab_size)``, or a non-empty list
            (or tuple) of them (returned as a tuple).
        seed: ``None`` or an integer in ``[0, 2**64)``.
        vocab_size: the model's vocabulary, to check ``eos_token_id`` against.

    Raises:
        ValueError: a value of the wrong type or range, or ``top_k``/``top_p`` with greedy
            decoding; the message names the value and the fix.

    Example:
        >>> import numpy as np
        >>> check_sampling(0.8, top_k=np.int64(40), seed=np.uint32(7))
        Sampling(temperature=0.8, top_k=40, top_p=None, eos_token_id=None, seed=7)
        >>> check_sampling(0.0, top_k=40)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: top_k=40 has no effect with temperature=0 (...); set a temperature > 0 ... or drop top_k
    """
    if not _real(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(
            f"temperature must be a finite number >= 0 (0 is greedy decoding), got {temperature!r}"
        )
    temperature = float(temperature)
    if top_k is not None and (not _integer(top_k) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and (not _real(top_p) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be a number in (0, 1] or None, got {top_p!r}")
    if temperature == 0.0:
        for name, value in (("top_k", top_k), ("top_p", top_p)):
            if value is not None:
                raise ValueError(
                    f"{name}={value!r} has no effect with temperature=0 (greedy decoding takes the "
                    f"most likely token); set a temperature > 0 to sample, e.g. temperature=1.0, or "
                    f"drop {name}"
                )
    if isinstance(eos_token_id, (list, tuple)):
        if not eos_token_id:
            raise ValueError("eos_token_id is an empty list; give at least one id, or None")
        eos_token_id = tuple(check_token_id("eos_token_id", value, vocab_size) for value in eos_token_id)
    elif eos_token_id is not None:
        eos_token_id = check_token_id("eos_token_id", eos_token_id, vocab_size)
    if seed is not None and (not _integer(seed) or not 0 <= seed < 2**64):
        raise ValueError(f"seed must be an integer in [0, 2**64) or None, got {seed!r}")
    return Sampling(
        temperature,
        None if top_k is None else int(top_k),
        None if top_p is None else float(top_p),
        eos_token_id,
        None if seed is None else int(seed),
    )


def check_token_id(name: str, value: object, vocab_size: int | None) -> int:
    """``value`` as a Python int, checked to be a token id in ``[0, vocab_size)``.

    Raises:
        ValueError: not an integer (bools and floats included), or outside the vocabulary;
            the message names the argument ``name``.
    """
    if not _integer(value):
        raise ValueError(
            f"{name} must be an integer token id or None, got {value!r} "
            f"({type(value).__name__}); pass int(...) of the tokenizer's id"
        )
    if vocab_size is not None and not 0 <= value < vocab_size:
        raise ValueError(f"{name} {value} is outside [0, vocab_size={vocab_size})")
    return int(value)


def sample_next(
    logits: Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draws one token per row from ``logits`` (B, V).

    ``temperature == 0`` is greedy (argmax). Otherwise the logits, shifted so that each
    row's largest is 0, are divided by the temperature (so no temperature overflows them),
    restricted to the ``top_k`` largest and to the smallest set whose probability reaches
    ``top_p`` (nucleus), and sampled with ``generator``. The arguments are assumed checked
    (:func:`check_sampling`).

    Example:
        >>> logits = torch.tensor([[1e30, 2e30, 0.0]])
        >>> sample_next(logits, temperature=1e-30).tolist()
        [1]
    """
    if temperature == 0.0:
        return logits.argmax(-1)
    logits = logits.float()
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
