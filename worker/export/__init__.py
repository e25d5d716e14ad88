"""Writing an adapter out as other artifacts: merged safetensors (merge.py) and GGUF (gguf_writer.py)."""
