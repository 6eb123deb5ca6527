"""Generative language models: Hugging Face causal LMs as teachers and students (task ``causal_lm``).

Token-level KD (:mod:`.divergence`: forward/reverse KL, generalized JSD, TVD over the next-token distributions,
teacher distributions kept as top-k log-probabilities plus tail mass), derived and fresh students, and the
``hf`` / ``gguf`` / ``onnx`` exports. Loaded lazily: importing :mod:`engine` never imports transformers.
"""
