"""The code :func:`zoo.to_hf` copies into the folders of adaptive models.

transformers loads it with ``trust_remote_code=True``: ``configuration_ponder_zoo.py``
holds the config class, ``modeling_ponder_zoo.py`` the model, which rebuilds the zoo model
from the config (``zoo.ModelConfig.from_dict``, ``zoo.build_model``) and runs it. Both
files are plain modules of this package too, so the tests import exactly what is shipped.
"""
