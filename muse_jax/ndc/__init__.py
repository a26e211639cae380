"""Nucleus detection and classification (NDC): point-proposal head, large-FoV semi-supervised fine-tuning,
inference (`infer.Predictor`) and the benchmark metrics (`metrics.evaluate`)."""
