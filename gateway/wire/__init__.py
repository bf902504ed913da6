"""The OpenAI wire format: request schemas, their conversion to domain types, response JSON."""
