"""Turning a model into replies: sampling, the generator, speculative decoding, grammar
constraints, sessions with prefix reuse and the prompt cache. Knows no HTTP and no terminal."""
