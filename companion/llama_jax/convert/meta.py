"""Meta's original checkpoint format: ``params.json`` + ``consolidated.00.pth`` (the ``original/``
folder of the meta-llama repositories on the Hugging Face Hub).

Two things differ from Hugging Face's format besides the names:

* **The q/k row order.** Meta's RoPE rotates *adjacent* pairs of each head's dimensions
  (0, 1), (2, 3), ...; transformers rotates the two *halves* (i, i + head_dim/2). The two give the same
  attention only if the rows of ``wq`` and ``wk`` are permuted: within each head, Meta's rows are
  ``[x0 y0 x1 y1 ...]`` and Hugging Face's are ``[x0 x1 ... y0 y1 ...]``. Forget it and the model loads
  without complaint and writes nonsense.
* **The config.** ``params.json`` has no ``intermediate_size``: Meta computes it from ``dim``,
  ``ffn_dim_multiplier`` and ``multiple_of``. It says ``use_scaled_rope: true`` for Llama 3.1/3.2 but not
  the scaling factor, which Meta's code takes from the model family (8 for Llama 3.1, 32 for 3.2).
  ``from_meta`` does not guess it: the caller passes it, or the model's Hugging Face config.
"""

from __future__ import annotations

import glob
import json
import math
import os

import jax.numpy as jnp
import numpy as np

from ..config import CheckpointError, ConfigError, LlamaConfig, RopeScaling
from ..extras import import_torch
from ..model import LlamaForCausalLM
from ..sharding import TENSOR_PARALLEL
from ..weights import hf_tensors, model_from_tensors

# Meta name -> Hugging Face name; "{i}" is the layer index.
_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# params.json keys that Meta's Llama 3 code reads, and those that describe only how it runs.
_PARAMS = {
    "dim",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "vocab_size",
    "ffn_dim_multiplier",
    "multiple_of",
    "norm_eps",
    "rope_theta",
    "use_scaled_rope",
}
_RUNTIME_PARAMS = {"max_batch_size", "max_seq_len"}
# Meta's code hard-codes these three llama3 RoPE values; only the factor varies by family.
_META_ROPE = dict(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)


def meta_to_hf_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Un-permute q/k rows, Meta (interleaved pairs) -> Hugging Face (halves): [N*D, H] -> [N*D, H].

    Per head the rows are indexed (pair i, member j) by Meta and (member j, pair i) by Hugging Face.
    """
    rows, cols = w.shape
    return w.reshape(num_heads, rows // num_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def unpermute_qk(hf_name: str, w: np.ndarray, config: LlamaConfig) -> np.ndarray:
    """A tensor in Meta's layout -> Hugging Face's: q/k projections un-permuted, everything else as is."""
    if hf_name.endswith("q_proj.weight"):
        return meta_to_hf_rows(w, config.num_attention_heads)
    if hf_name.endswith("k_proj.weight"):
        return meta_to_hf_rows(w, config.num_key_value_heads)
    return w


def hf_to_meta_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """The inverse of ``meta_to_hf_rows``: Hugging Face (halves) -> Meta (interleaved pairs)."""
    rows, cols = w.shape
    return w.reshape(num_heads, 2, rows // num_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def meta_intermediate_size(dim: int, ffn_dim_multiplier: float | None, multiple_of: int) -> int:
    """Meta's FFN width: 2/3 of 4*dim, times ``ffn_dim_multiplier``, rounded up to ``multiple_of``."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def meta_ffn_params(dim: int, intermediate_size: int) -> tuple[float, int]:
    """``(ffn_dim_multiplier, multiple_of)`` for which Meta's formula gives ``intermediate_size`` exactly.

    Prefers round values: the shortest decimal multiplier, ``multiple_of`` 256 (Meta's usual) or another
    power of two (Llama 3.2 1B: dim 2048, 8192 -> (1.5, 256)).
    """
    base = int(2 * 4 * dim / 3)
    multiples = [m for m in (256, 1024, 512, 128, 64, 32, 16, 8, 4, 2, 1) if intermediate_size % m == 0]
    for digits in range(1, 10):
        multiplier = round(intermediate_size / base, digits) if base else 0.0
        for multiple_of in multiples:
            if multiplier > 0 and meta_intermediate_size(dim, multiplier, multiple_of) == intermediate_size:
                return multiplier, multiple_of
    raise ConfigError(
        f"intermediate_size={intermediate_size} cannot be written in Meta's params.json for dim={dim}: "
        "no ffn_dim_multiplier/multiple_of reproduces it with Meta's formula"
    )


def _read_params(directory: str) -> dict:
    path = os.path.join(directory, "params.json")
    try:
        with open(path) as f:
            params = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"no params.json in {directory} (is this Meta's original/ folder?)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if unknown := sorted(params.keys() - _PARAMS - _RUNTIME_PARAMS):
        raise ConfigError(
            f"{path}: unsupported field(s) {unknown} (quantized, LoRA or multimodal checkpoints are not supported)"
        )
    for field in ("dim", "n_layers", "n_heads", "vocab_size"):
        if not isinstance(params.get(field), int) or params[field] <= 0:
            raise ConfigError(
                f"{path}: field {field!r} must be a positive integer, got {params.get(field)!r}"
            )
    return params


def _check_hf_config(params: dict, hf_config: LlamaConfig, source: str) -> None:
    """Raise a ConfigError when ``hf_config`` does not describe the model of ``params``."""
    dim, heads = params["dim"], params["n_heads"]
    expected = {
        "hidden_size": dim,
        "num_hidden_layers": params["n_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": params.get("n_kv_heads") or heads,
        "head_dim": dim // heads,
        "vocab_size": params["vocab_size"],
        "rope_theta": float(params.get("rope_theta", 500000.0)),
        "scaled RoPE": bool(params.get("use_scaled_rope")),
    }
    for field, value in expected.items():
        theirs = hf_config.rope_scaling is not None if field == "scaled RoPE" else getattr(hf_config, field)
        if theirs != value:
            raise ConfigError(
                f"{source} has {field}={value} but the Hugging Face config has {theirs}: not the same model"
            )
    eps = float(params.get("norm_eps", 1e-5))
    if not math.isclose(eps, hf_config.rms_norm_eps, rel_tol=1e-6):
        raise ConfigError(
            f"{source} has norm_eps={eps} but the Hugging Face config has rms_norm_eps={hf_config.rms_norm_eps}"
        )
    if hf_config.rope_scaling is not None:
        theirs = {k: getattr(hf_config.rope_scaling, k) for k in _META_ROPE}
        if theirs != _META_ROPE:
            raise ConfigError(
                f"the Hugging Face config's llama3 RoPE {theirs} differs from Meta's fixed values {_META_ROPE}"
            )


def meta_config(
    params: dict,
    *,
    tie_word_embeddings: bool,
    rope_scaling_factor: float | None = None,
    hf_config: LlamaConfig | None = None,
    source: str = "params.json",
) -> LlamaConfig:
    """A LlamaConfig from Meta's ``params.json`` fields (see ``from_meta`` for what the file leaves out).

    The llama3 RoPE factor is not in ``params.json``: it comes from ``rope_scaling_factor`` or from
    ``hf_config`` (checked against ``params`` first), else a ConfigError is raised.
    """
    dim, heads = params["dim"], params["n_heads"]
    if hf_config is not None:
        _check_hf_config(params, hf_config, source)
    if params.get("use_scaled_rope"):
        factor = rope_scaling_factor
        if hf_config is not None:
            if factor is not None and float(factor) != hf_config.rope_scaling.factor:
                raise ConfigError(
                    f"rope_scaling_factor={factor} contradicts the Hugging Face config's factor "
                    f"{hf_config.rope_scaling.factor}"
                )
            factor = hf_config.rope_scaling.factor
        if factor is None:
            raise ConfigError(
                f"{source}: use_scaled_rope is set but params.json has no RoPE scaling factor (8 for Llama "
                "3.1, 32 for Llama 3.2): pass rope_scaling_factor= or hf_config= (the model's config.json)"
            )
        scaling = RopeScaling(factor=float(factor), **_META_ROPE)
    elif rope_scaling_factor is not None:
        raise ConfigError(
            f"{source}: rope_scaling_factor={rope_scaling_factor} given, but use_scaled_rope is not set"
        )
    else:
        scaling = None
    if hf_config is not None:  # it also knows the special tokens and the context length
        max_positions = hf_config.max_position_embeddings
        tokens = dict(
            bos_token_id=hf_config.bos_token_id,
            eos_token_id=hf_config.eos_token_id,
            pad_token_id=hf_config.pad_token_id,
        )
    else:
        max_positions = params.get("max_seq_len") or (131072 if scaling else 8192)
        tokens = {}
    return LlamaConfig(
        vocab_size=params["vocab_size"],
        hidden_size=dim,
        intermediate_size=meta_intermediate_size(
            dim, params.get("ffn_dim_multiplier"), params.get("multiple_of", 256)
        ),
        num_hidden_layers=params["n_layers"],
        num_attention_heads=heads,
        num_key_value_heads=params.get("n_kv_heads") or heads,
        head_dim=dim // heads,
        rms_norm_eps=float(params.get("norm_eps", 1e-5)),
        rope_theta=float(params.get("rope_theta", 500000.0)),
        rope_scaling=scaling,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie_word_embeddings,
        **tokens,
    )


def meta_to_hf_name(name: str) -> str:
    """Meta's tensor name -> Hugging Face's (an unknown name is returned unchanged, to be reported)."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return name


def from_meta(
    directory: str | os.PathLike,
    dtype=jnp.bfloat16,
    rope_scaling_factor: float | None = None,
    *,
    hf_config=None,
    progress: bool | None = None,
    mesh=None,
    rules=TENSOR_PARALLEL,
) -> LlamaForCausalLM:
    """Load Meta's original checkpoint (``params.json`` + ``consolidated.00.pth``).

    Meta's ``params.json`` says only ``use_scaled_rope: true``; the llama3 RoPE factor is not in the file
    (Meta's code takes it from the model family: 8 for Llama 3.1, 32 for Llama 3.2). A wrong factor
    loads without complaint and gives wrong logits, so there is no default: with ``use_scaled_rope`` set,
    pass ``rope_scaling_factor``, or ``hf_config``, else a ConfigError is raised.
    ``hf_config``: the same model's Hugging Face config (a directory, a config.json dict or a LlamaConfig;
    in the meta-llama hub repositories, the folder above ``original/``). It is checked against
    ``params.json`` (sizes, heads, vocabulary, RoPE) and gives the factor, the special tokens and the
    context length. The other llama3 RoPE values are the ones Meta's code hard-codes: low_freq_factor 1,
    high_freq_factor 4, original context 8192.

    The head is tied to the embedding when ``output.weight`` is absent or equal to
    ``tok_embeddings.weight`` (Llama 3.2 1B/3B). ``params.json`` names no special tokens: without
    ``hf_config`` the config's ``bos_token_id``/``eos_token_id`` are left empty, and
    ``max_position_embeddings`` is ``max_seq_len`` when given, else 131072 with scaled RoPE and 8192 without.
    """
    torch = import_torch("from_meta")

    directory = os.fspath(directory)
    params = _read_params(directory)
    if hf_config is not None and not isinstance(hf_config, LlamaConfig):
        hf_config = LlamaConfig.from_hf(hf_config)
    shards = sorted(glob.glob(os.path.join(directory, "consolidated.*.pth")))
    if not shards:
        raise CheckpointError(f"no consolidated.00.pth in {directory}")
    if len(shards) > 1:
        raise CheckpointError(
            f"{directory} holds {len(shards)} model-parallel shards (consolidated.*.pth); only single-file "
            "checkpoints (Llama 3.2 1B/3B, 3.1 8B) are supported"
        )
    path = shards[0]
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises several types for a corrupt or foreign file
        raise CheckpointError(f"cannot read {path}: {e}") from None

    # rope.freqs (Llama 1/2 checkpoints) is computed from the config, not learned.
    state = {name: tensor for name, tensor in state.items() if name != "rope.freqs"}
    tied = "output.weight" not in state or (
        "tok_embeddings.weight" in state
        and torch.equal(state["output.weight"], state["tok_embeddings.weight"])
    )
    if tied:
        state.pop("output.weight", None)
    config = meta_config(
        params,
        tie_word_embeddings=tied,
        rope_scaling_factor=rope_scaling_factor,
        hf_config=hf_config,
        source=os.path.join(directory, "params.json"),
    )

    meta_names = {meta_to_hf_name(name): name for name in state}
    shapes = {hf: tuple(state[meta].shape) for hf, meta in meta_names.items()}

    def read(hf_name: str) -> np.ndarray:
        return unpermute_qk(hf_name, state[meta_names[hf_name]].to(torch.float32).numpy(), config)

    return model_from_tensors(
        config, shapes, read, dtype=dtype, source=path, progress=progress, mesh=mesh, rules=rules
    )


def to_meta(model: LlamaForCausalLM, directory: str | os.PathLike) -> str:
    """Write ``model`` in Meta's format: ``consolidated.00.pth`` (``torch.save`` of Meta-named tensors, q/k
    rows permuted back to Meta's interleaved layout) and ``params.json``. Returns the directory.

    Meta's format cannot say everything a Hugging Face config can: the head_dim must be dim / n_heads,
    llama3 RoPE must use Meta's fixed values (low 1, high 4, original context 8192), and the scaling factor
    is not written (pass it to ``from_meta``). ``ffn_dim_multiplier``/``multiple_of`` are chosen so that
    Meta's formula gives the model's intermediate size exactly. Anything else raises a ConfigError.
    """
    torch = import_torch("to_meta")

    config = model.config
    if config.head_dim * config.num_attention_heads != config.hidden_size:
        raise ConfigError(
            f"head_dim={config.head_dim} is not hidden_size/num_attention_heads="
            f"{config.hidden_size}/{config.num_attention_heads}: Meta's params.json cannot express it"
        )
    if config.rope_scaling is not None:
        odd = {
            k: getattr(config.rope_scaling, k)
            for k, v in _META_ROPE.items()
            if getattr(config.rope_scaling, k) != v
        }
        if odd:
            raise ConfigError(
                f"llama3 RoPE scaling {odd} differs from Meta's fixed values {_META_ROPE}: params.json cannot express it"
            )
    multiplier, multiple_of = meta_ffn_params(config.hidden_size, config.intermediate_size)
    params = {
        "dim": config.hidden_size,
        "n_layers": config.num_hidden_layers,
        "n_heads": config.num_attention_heads,
        "n_kv_heads": config.num_key_value_heads,
        "vocab_size": config.vocab_size,
        "ffn_dim_multiplier": multiplier,
        "multiple_of": multiple_of,
        "norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "use_scaled_rope": config.rope_scaling is not None,
    }

    hf = hf_tensors(model)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        str(hf["model.norm.weight"].dtype)
    ]
    to_hf = {hf_name: meta_name for meta_name, hf_name in _TOP_NAMES.items()}
    state = {}
    for name, w in hf.items():
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            meta_name = f"layers.{i}." + next(m for m, h in _LAYER_NAMES.items() if h == rest)
        else:
            meta_name = to_hf[name]
        if name.endswith("q_proj.weight"):
            w = hf_to_meta_rows(w, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            w = hf_to_meta_rows(w, config.num_key_value_heads)
        state[meta_name] = torch.from_numpy(np.array(w, np.float32)).to(torch_dtype)
    if config.tie_word_embeddings:  # Meta's files carry the head even when it is tied
        state["output.weight"] = state["tok_embeddings.weight"].clone()

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    # Each file is written under a temporary name, then renamed: never a half-written file under the real name.
    torch.save(state, os.path.join(directory, ".consolidated.00.pth.tmp"))
    os.replace(
        os.path.join(directory, ".consolidated.00.pth.tmp"), os.path.join(directory, "consolidated.00.pth")
    )
    with open(os.path.join(directory, ".params.json.tmp"), "w") as f:
        json.dump(params, f, indent=2)
    os.replace(os.path.join(directory, ".params.json.tmp"), os.path.join(directory, "params.json"))
    return directory
