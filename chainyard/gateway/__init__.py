"""The HTTP gateway: OpenAI and Anthropic wire formats and chainyard's chain API over NATS, with
API keys per tenant and per-key limits shared by every replica (docs/GATEWAY.md)."""
