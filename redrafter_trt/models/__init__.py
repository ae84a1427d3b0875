"""Base LLM modeling, the draft head, model files and the built-in default model."""
