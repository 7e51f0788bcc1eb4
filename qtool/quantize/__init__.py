"""``qtool quantize`` beyond GGUF k-quants: RTN with clipping, GPTQ, W8A8 activations, BitNet
ternary, and the GPTQ / compressed-tensors safetensors writers."""
