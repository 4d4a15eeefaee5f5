"""Real models built on cattn's layers.

`cattn.models.bert`    a BERT encoder (embeddings + post-layer-norm transformer layers) whose
                       self-attention is `cattn.MultiHeadAttention`, loaded from Hugging Face
                       BertModel weights;
`cattn.models.minilm`  all-MiniLM-L6-v2 sentence embeddings on that encoder.

Nothing is imported here, so `import cattn` stays light; import the module you need.
"""
