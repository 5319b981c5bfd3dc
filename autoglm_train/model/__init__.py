"""The modular model: a stock GLM decoder plus modality plugins fused at placeholder tokens."""
