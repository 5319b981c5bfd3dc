"""One ``run(cfg)`` per recipe; ``python train.py recipe=<name>`` picks the module."""
