"""Text: the tokenizer, the V4 chat encoding (messages to prompt) and the reply parser. Knows no
model and no HTTP."""
