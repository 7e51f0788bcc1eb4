"""GGUF export: HF checkpoint -> GGUF file llama.cpp loads, streamed tensor by tensor."""
