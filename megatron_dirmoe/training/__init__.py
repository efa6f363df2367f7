"""Training entry pieces: arguments and presets, the CPU loop, the CUDA path, checkpoints."""
