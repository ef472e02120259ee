"""Built-in models: `mlp` and `gpt`. Any importable `torch.nn.Module` can be named instead."""
