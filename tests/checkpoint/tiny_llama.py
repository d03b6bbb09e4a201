"""The tiny Llama shape the checkpoint tests build (GQA: 4 query heads, 2 KV heads)."""

TINY = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
