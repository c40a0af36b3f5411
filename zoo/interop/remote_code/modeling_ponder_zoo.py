"""transformers model of a ponder-zoo checkpoint (written by ``zoo.to_hf``).

The computation is ponder-zoo's own: this file rebuilds the zoo model from the config
(``zoo.ModelConfig.from_dict`` and ``zoo.build_model``) and calls it, so the ponder-zoo
library must be installed (``pip install ponder-zoo``, the version in ``config.json``'s
``zoo_version``). The weights are the zoo model's parameters under ``model.``.
"""

from dataclasses import dataclass

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_ponder_zoo import PonderZooConfig

try:
    import zoo
except ImportError as err:  # transformers only checks imports outside try blocks
    raise ImportError(
        "this model runs on the ponder-zoo library, which is not installed: pip install ponder-zoo"
    ) from err


@dataclass
class PonderZooCausalLMOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus ``depth``, the (B, T) passes each token ran."""

    depth: torch.LongTensor | None = None


class PonderZooForCausalLM(PreTrainedModel, GenerationMixin):
    """A ponder-zoo model behind the transformers causal-LM interface.

    ``forward(input_ids, attention_mask=None, labels=None)`` returns the zoo model's logits
    (and ``depth``); a left-padded ``attention_mask`` gives every row what it gets alone
    (padding: depth 0, logits zeros); ``labels`` give the usual shifted cross-entropy loss
    (-100 ignored, and targets predicted from padding). There is no
    key/value cache here: ``generate`` recomputes the prefix at every step. ponder-zoo's
    own ``model.generate`` decodes incrementally with the same results.
    """

    config_class = PonderZooConfig
    base_model_prefix = "model"
    _tied_weights_keys = {"model.head.weight": "model.embed.weight"}

    def __init__(self, config: PonderZooConfig):
        super().__init__(config)
        self.model = zoo.build_model(zoo.ModelConfig.from_dict(config.zoo_config))
        self.post_init()

    def _init_weights(self, module):
        # The zoo model initialises itself when built; from_pretrained then loads every tensor.
        pass

    def get_input_embeddings(self):
        return self.model.embed

    def get_output_embeddings(self):
        return self.model.head

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        # No cache: every step runs the whole sequence so far.
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        if input_ids is None:
            raise ValueError("ponder-zoo models take input_ids (inputs_embeds is not supported)")
        # Left padding as transformers' tokenizers give it (padding_side="left"): every row
        # gets what it gets alone; right padding is refused with the fix.
        out = self.model(input_ids, attention_mask=attention_mask, labels=labels)
        return PonderZooCausalLMOutput(loss=out.loss, logits=out.logits, depth=out.depth)
