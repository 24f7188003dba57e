"""Floor 3: export and runtimes (onnxruntime), latency timing."""
