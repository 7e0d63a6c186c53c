"""The HTTP gateway: OpenAI and Anthropic wire formats and chainyard's chain API over NATS."""
