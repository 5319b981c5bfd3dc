"""Image/audio → text pairs for training modality plugins: embedded real data and users' own files.

Sources (``digits``, ``espeak``, ``local``) yield :class:`~.pairs.Pair` items and count what they
skip; :class:`~.datamodule.PairDataModule` runs the plugin's own preprocessing, tokenizes
question + answer and serves train / val / held-out test loaders.
"""
