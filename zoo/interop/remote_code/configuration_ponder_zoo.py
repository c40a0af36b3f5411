"""transformers configuration of a ponder-zoo model (written by ``zoo.to_hf``).

The model is described entirely by ``zoo_config``, the fields of a ``zoo.ModelConfig``;
the usual transformers keys (``vocab_size``, ``hidden_size``, ...) repeat its shapes for
tools that read them.
"""

from transformers import PretrainedConfig


class PonderZooConfig(PretrainedConfig):
    """A ponder-zoo model's config: ``zoo_config`` plus the shapes transformers tools read.

    Args:
        zoo_config: the fields of the ``zoo.ModelConfig`` (``ModelConfig.to_dict()``).
        zoo_version: the ponder-zoo version that wrote the folder.
        **kwargs: the usual ``PretrainedConfig`` keys.
    """

    model_type = "ponder_zoo"

    def __init__(self, zoo_config=None, zoo_version=None, **kwargs):
        self.zoo_config = dict(zoo_config or {})
        self.zoo_version = zoo_version
        super().__init__(**kwargs)
