"""autoglm-train: the training side of a modular, phone-class multimodal GLM."""

__version__ = "0.1.0"
