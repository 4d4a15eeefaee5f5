"""cattn inside other frameworks, each an optional extra imported only when asked for:

    cattn.integrations.torch         the PyTorch operator torch.ops.cattn.scaled_dot_product_attention
    cattn.integrations.transformers  attn_implementation="cattn" for Hugging Face transformers

Importing this package imports neither PyTorch nor transformers.
"""
