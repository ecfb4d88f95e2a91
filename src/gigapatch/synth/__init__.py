"""gigapatch.synth: synthetic data sets (UltraMNIST, Megapixel MNIST, gigapixel TIFFs)."""
