"""Training loops and data for modeling_moe models: pretraining on the embedded corpus, SFT and RL with TRL."""
