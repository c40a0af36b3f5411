"""The recipes, installed with the library: each module is one readable script.

``recipes/<name>.py`` in the repository and the console script ``ponder-zoo <command>``
(:mod:`zoo.cli`) run these modules; each has ``build_parser`` (its options, with
defaults), ``run`` (parsed options to an exit status) and ``main`` (both). The pieces they
share, settings as options, overrides and the trainer's options, are in
:mod:`zoo.recipes.common`.
"""
