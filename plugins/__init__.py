"""Cross-cutting plugins registered under gateway.plugins."""
