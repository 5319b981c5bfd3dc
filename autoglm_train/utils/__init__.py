"""Small shared helpers: safetensors checkpoint IO for Lightning and "resume from last" resolution."""
