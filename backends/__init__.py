"""Inference backends, one package per engine, registered under gateway.backends."""
