"""The optimization of one (image, prompt) pair's mask: mask parameterizations, the LightningModule that wires
the dream loss and gravity, its optimizer and learning-rate schedule, where masks start (regions, restarts), and
the engine that drives Lightning over a batch of pairs."""
