"""Attention nodes: the half of every layer that owns the KV cache, plus embeddings, LM head and sampling."""
