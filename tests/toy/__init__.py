"""A third modality defined outside the package: proof that a plugin is one class + one yaml."""
