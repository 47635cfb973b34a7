"""Preset model folders (config, generation config, tokenizer, model card) to instantiate models from."""
