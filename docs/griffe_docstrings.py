"""A griffe extension for the API pages: the docstrings' reST habits read as Markdown.

The library's docstrings are Google style with a few reST habits that Markdown does not
share:

* ``Example:`` sections. Google style reads the singular as a free-text admonition, where
  doctest lines (``>>> ...``) would render as nested block quotes; ``Examples:`` splits
  them into code blocks, so the build reads the singular as the plural.
* Sphinx roles such as ``:class:`~zoo.model.RecurrentLM``` would show their markup; they
  become inline code, with ``~`` keeping the last dotted component as Sphinx does.
* A paragraph ending in ``::`` introduces an indented literal block, which Markdown
  renders as code already; the ``::`` becomes a single colon.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_SINGULAR = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
_LITERAL = re.compile(r"(\S)::[ \t]*$", re.MULTILINE)
_ROLE = re.compile(r":(?:class|func|meth|attr|mod|obj|data|exc|const):`(~?)([^`]+)`")


def _role(match: re.Match) -> str:
    short, target = match.group(1), match.group(2)
    return f"`{target.rsplit('.', 1)[-1] if short else target}`"


class MarkdownDocstrings(griffe.Extension):
    """Rewrites the three habits above in every docstring, before it is parsed."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            text = _SINGULAR.sub(r"\1Examples:", obj.docstring.value)
            text = _LITERAL.sub(r"\1:", _ROLE.sub(_role, text))
            obj.docstring.value = text
