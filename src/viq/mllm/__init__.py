"""The LLM side: chat tokenisation with answer-only labels, splicing image features into token
sequences and packing, loading and adapting a causal LM, and the multimodal projector."""
