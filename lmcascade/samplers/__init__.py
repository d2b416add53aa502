"""Token samplers: how a decoding step chooses each run's next token(s)."""
