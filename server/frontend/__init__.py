"""What both doors share between the wire and the engine: tokenization and request checks (inference.py),
the token-file auth, one request-events generator, and n-sample sets."""
