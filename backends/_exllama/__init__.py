"""What the ExLlamaV2 and ExLlamaV3 backends share: config, prompts, the engine loop, the Backend.

Not a backend itself (nothing registers it); ``backends.exllamav2`` and ``backends.exllamav3``
add their loaders, cache formats and sampler mappings.
"""
