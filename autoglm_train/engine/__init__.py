"""The generation engine that training-time evaluation, the eval tools and the server share."""
