"""Knowledge distillation: teacher→student losses and the pieces that feed them."""
