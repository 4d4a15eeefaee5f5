"""A sentence-transformers model folder: the optional packages loading one needs, and the
pipeline options (pooling, normalization, lengths, lower-casing, similarity) its JSON files
set."""
import importlib
import json
import os

from cattn import _encoder_ops as ops

MODEL_EXTRA = 'pip install "cattn[model]"'
# Pooling modes in the order sentence-transformers concatenates them.
POOLING_MODES = {"cls": ops.POOL_CLS, "max": ops.POOL_MAX, "mean": ops.POOL_MEAN,
                 "mean_sqrt_len_tokens": ops.POOL_MEAN_SQRT_LEN}
_POOLING_CONFIG_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                        "pooling_mode_mean_tokens": "mean",
                        "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens"}


def optional_import(module, what="loading a pretrained model"):
    """Import an optional dependency, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{what} needs {module!r} ({e}): install the model extra with  "
                          f"{MODEL_EXTRA}") from None


def _read_json(folder, name, required=True):
    file = os.path.join(folder, name)
    if not os.path.exists(file):
        if required:
            raise FileNotFoundError(f"{folder!r} has no {name}")
        return None
    with open(file) as f:
        return json.load(f)


_TRANSFORMER = ("sentence_transformers.models.Transformer",
                "sentence_transformers.base.modules.Transformer")
_POOLING = ("sentence_transformers.models.Pooling",
            "sentence_transformers.sentence_transformer.modules.Pooling")
_NORMALIZE = ("sentence_transformers.models.Normalize",
              "sentence_transformers.sentence_transformer.modules.Normalize")


def _pipeline_options(path):
    """SentenceEncoder options from a model folder's sentence-transformers files. Without
    modules.json: mean pooling, no normalization (what sentence-transformers builds around
    a plain Hugging Face model)."""
    options = {"pooling": "mean", "normalize": False}
    st_config = _read_json(path, "sentence_bert_config.json", required=False) or {}
    if "max_seq_length" in st_config:
        options["max_seq_length"] = int(st_config["max_seq_length"])
    options["do_lower_case"] = bool(st_config.get("do_lower_case", False))
    st_options = _read_json(path, "config_sentence_transformers.json", required=False) or {}
    if st_options.get("similarity_fn_name"):
        options["similarity_fn_name"] = st_options["similarity_fn_name"]
    for key in ("prompts", "default_prompt_name"):
        if st_options.get(key):
            options[key] = st_options[key]
    modules = _read_json(path, "modules.json", required=False)
    if modules is None:
        return options
    for module in sorted(modules, key=lambda m: m.get("idx", 0)):
        kind = module.get("type", "")
        if kind in _TRANSFORMER:
            if module.get("path", "") not in ("", "."):
                raise ValueError(f"the Transformer module must be the model folder itself, "
                                 f"modules.json says {module.get('path')!r}")
        elif kind in _POOLING:
            options["pooling"] = _pooling_modes(_read_json(
                os.path.join(path, module.get("path", "")), "config.json"))
        elif kind in _NORMALIZE:
            options["normalize"] = True
        else:
            raise ValueError(f"the module {kind!r} in modules.json is not supported "
                             f"(supported: Transformer, Pooling, Normalize)")
    return options


def _pooling_modes(config):
    """Pooling modes from a Pooling module's config.json (old boolean keys, or the newer
    "pooling_mode" string or list)."""
    unsupported = [k for k in ("pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")
                   if config.get(k)]
    if unsupported:
        raise ValueError(f"pooling {unsupported} is not supported (supported: "
                         f"{tuple(POOLING_MODES)})")
    if "pooling_mode" in config:
        named = config["pooling_mode"]
        named = [named] if isinstance(named, str) else list(named)
        aliases = {"mean_tokens": "mean", "max_tokens": "max", "cls_token": "cls",
                   "mean_sqrt_len": "mean_sqrt_len_tokens"}
        return [aliases.get(m, m) for m in named]
    modes = [mode for key, mode in _POOLING_CONFIG_KEYS.items() if config.get(key)]
    if not modes:
        raise ValueError("the Pooling module's config.json turns on no pooling mode")
    return modes
