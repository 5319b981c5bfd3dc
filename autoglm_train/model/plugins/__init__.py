"""Shipped modality plugins; each is selected by ``conf/plugin/<name>.yaml``.

The classes import only torch/numpy at module level: transformers is imported when an
encoder is built, so importing this package stays cheap for text-only runs.
"""

from autoglm_train.model.plugins.speech import SpeechPlugin, resample
from autoglm_train.model.plugins.vision import VisionPlugin

__all__ = ["SpeechPlugin", "VisionPlugin", "resample"]
