"""Built-in datasets. Each takes `split` ("train" or "val") and yields (input, target) pairs; `model_kwargs`
tells the model what it needs to know of the data (vocab_size, num_classes, ...)."""
