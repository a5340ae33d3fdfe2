"""Framework adapters: DLPack conversion and the HPS-compatible TensorFlow plugin."""
