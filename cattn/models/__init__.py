"""Real models built on cattn's layers.

`SentenceEncoder`      sentence embeddings from a sentence-transformers BERT-family model folder
                       (`SentenceEncoder.from_pretrained(path)`), with `encode`,
                       `similarity` and `quantize_embeddings` as sentence-transformers has them;
`cattn.models.bert`    the BERT encoder (embeddings + post-layer-norm transformer layers,
                       each a `BertLayer` that runs padded or packed batches) whose
                       self-attention is `cattn.MultiHeadAttention`, loaded from Hugging Face
                       BertModel weights;
`cattn.models.minilm`  all-MiniLM-L6-v2 ready-made: `MiniLM.from_pretrained()`.

Behind `SentenceEncoder`: `_folder` reads a model folder's options, `_safetensors` its
weights, `_packed` runs the packed forward pass.

Importing this package loads NumPy code only; tokenizers is imported when a model folder is
loaded (NumPy reads the safetensors weights).
"""
from cattn.models.sentence import SentenceEncoder, quantize_embeddings, similarity

__all__ = ["SentenceEncoder", "quantize_embeddings", "similarity"]
