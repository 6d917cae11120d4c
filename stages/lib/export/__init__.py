"""make export: the Hugging Face folder (hf), the ONNX file (onnx), the torch-free runtime
(onnx_runtime) and the proofs that both copies equal the trained model (proofs)."""
