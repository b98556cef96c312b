"""The network and its state: layers, mHC, attention with its pools, the compiled decode step,
custom kernels, MoE expert streaming, and loading a converted directory. Knows no tokenizer."""
