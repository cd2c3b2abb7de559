"""The models of the coverage sets of ``zoo_report.py`` (issue 14, "Measure: Coverage").

- :data:`HF`: Hugging Face ``transformers`` base models, one per architecture, each with a tiny
  random configuration (hidden size 16-64, 1-2 layers or stages, 1-4 heads, vocabulary 100) and
  the call a user makes: decoders and encoder-decoders with ``use_cache=False``, text with a padded
  attention mask, audio with raw samples or features, vision with 32x32 (MobileViT: 64x64) images.
- :data:`TIMM`: ``timm`` models, the smallest variant of each family, ``pretrained=False``, at
  96x96 where the model takes any size, else at its fixed input size.

Every model is built with seed 0 and called on inputs from a generator seeded per batch size, so a
row does not depend on which rows ran before it. Nothing downloads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

Call = tuple[tuple[Any, ...], dict[str, Any]]

VOCAB = 100
SEQ = 16  # encoder (and decoder-only) sequence length
DEC_SEQ = 8  # decoder sequence length of encoder-decoders
#: The image size of the timm models that take any size (they are tested at it, not 224, to keep
#: the run short on 2 cores); every family in :data:`TIMM` was checked to run at it in eager.
TIMM_SMALL = 96


@dataclass(frozen=True)
class Spec:
    """One row of a coverage set: how to build the model and how to call it at a batch size."""

    name: str
    group: str
    build: Callable[[], torch.nn.Module]
    call: Callable[[int, torch.Generator], Call]
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- inputs

def padded_mask(b: int, s: int, gen: torch.Generator) -> torch.Tensor:
    """Tail padding: row 0 full, the others a random valid length of at least half the sequence."""
    lengths = torch.randint(s // 2, s + 1, (b,), generator=gen)
    lengths[0] = s
    return (torch.arange(s)[None, :] < lengths[:, None]).to(torch.int64)


def _ids(b: int, s: int, gen: torch.Generator, low: int = 3) -> torch.Tensor:
    # ids from 3 up: 0-2 are the pad/bos/eos of most configs, which some models treat specially
    return torch.randint(low, VOCAB, (b, s), generator=gen)


def text(b: int, gen: torch.Generator) -> Call:
    return (), {"input_ids": _ids(b, SEQ, gen), "attention_mask": padded_mask(b, SEQ, gen)}


def decoder(b: int, gen: torch.Generator) -> Call:
    return (), {"input_ids": _ids(b, SEQ, gen), "attention_mask": padded_mask(b, SEQ, gen), "use_cache": False}


def seq2seq(b: int, gen: torch.Generator) -> Call:
    return (), {"input_ids": _ids(b, SEQ, gen), "attention_mask": padded_mask(b, SEQ, gen),
                "decoder_input_ids": _ids(b, DEC_SEQ, gen), "use_cache": False}


def seq2seq_shifted(b: int, gen: torch.Generator) -> Call:
    """BART's and mBART's denoising call: no decoder_input_ids, the model shifts input_ids itself."""
    ids = _ids(b, SEQ, gen)
    ids[:, -1] = 2  # eos last: mBART's shift moves the last non-pad token (eos) to the front
    return (), {"input_ids": ids, "attention_mask": torch.ones(b, SEQ, dtype=torch.int64), "use_cache": False}


def image(size: int) -> Callable[[int, torch.Generator], Call]:
    def make(b: int, gen: torch.Generator) -> Call:
        return (), {"pixel_values": torch.randn(b, 3, size, size, generator=gen)}

    return make


def timm_image(size: int) -> Callable[[int, torch.Generator], Call]:
    def make(b: int, gen: torch.Generator) -> Call:
        return (torch.randn(b, 3, size, size, generator=gen),), {}

    return make


def waveform(samples: int) -> Callable[[int, torch.Generator], Call]:
    def make(b: int, gen: torch.Generator) -> Call:
        return (), {"input_values": torch.randn(b, samples, generator=gen)}

    return make


# --------------------------------------------------------------------------- Hugging Face: configs

def _t(cls: str, cfg: str, **kw: Any) -> Callable[[], torch.nn.Module]:
    """A constructor: ``transformers.<cls>(transformers.<cfg>(**kw))``, imported when called."""
    def build() -> torch.nn.Module:
        import transformers

        return getattr(transformers, cls)(getattr(transformers, cfg)(**kw))

    build.__qualname__ = cls
    return build


BERT = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64)
LLAMA = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
BART = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)
W2V = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
           conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
           num_conv_pos_embedding_groups=4)
VIT = dict(image_size=32, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
           intermediate_size=64)

HF: list[Spec] = [
    # ---- encoders
    Spec("BertModel", "encoder", _t("BertModel", "BertConfig", **BERT), text),
    Spec("RobertaModel", "encoder", _t("RobertaModel", "RobertaConfig", **BERT), text),
    Spec("XLMRobertaModel", "encoder", _t("XLMRobertaModel", "XLMRobertaConfig", **BERT), text),
    Spec("DistilBertModel", "encoder", _t("DistilBertModel", "DistilBertConfig", vocab_size=VOCAB, dim=32, n_layers=2,
                                          n_heads=4, hidden_dim=64, max_position_embeddings=64), text),
    Spec("AlbertModel", "encoder", _t("AlbertModel", "AlbertConfig", vocab_size=VOCAB, embedding_size=16,
                                      hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=64), text),
    Spec("ElectraModel", "encoder", _t("ElectraModel", "ElectraConfig", embedding_size=16, **BERT), text),
    Spec("DebertaV2Model", "encoder", _t("DebertaV2Model", "DebertaV2Config", relative_attention=True,
                                         pos_att_type=["p2c", "c2p"], position_biased_input=False,
                                         max_relative_positions=-1, position_buckets=8, norm_rel_ebd="layer_norm",
                                         share_att_key=True, **BERT), text, note="DeBERTa-v3 attention"),
    Spec("FunnelModel", "encoder", _t("FunnelModel", "FunnelConfig", vocab_size=VOCAB, d_model=32, n_head=4, d_head=8,
                                      d_inner=64, block_sizes=[1, 1, 1]), text),
    Spec("MPNetModel", "encoder", _t("MPNetModel", "MPNetConfig", **BERT), text),
    Spec("ConvBertModel", "encoder", _t("ConvBertModel", "ConvBertConfig", embedding_size=32, **BERT), text),
    Spec("RoFormerModel", "encoder", _t("RoFormerModel", "RoFormerConfig", embedding_size=32, **BERT), text),
    Spec("MobileBertModel", "encoder", _t("MobileBertModel", "MobileBertConfig", vocab_size=VOCAB, hidden_size=32,
                                          embedding_size=16, intra_bottleneck_size=16, true_hidden_size=16,
                                          num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
                                          num_feedforward_networks=2, max_position_embeddings=64), text),
    Spec("SqueezeBertModel", "encoder", _t("SqueezeBertModel", "SqueezeBertConfig", embedding_size=32, **BERT), text),
    # ---- decoders (use_cache=False: a cache is an output engines cannot return)
    Spec("LlamaModel", "decoder", _t("LlamaModel", "LlamaConfig", **LLAMA), decoder, note="GQA 4/2 heads"),
    Spec("MistralModel", "decoder", _t("MistralModel", "MistralConfig", sliding_window=8, **LLAMA), decoder,
         note="sliding window 8"),
    Spec("Qwen2Model", "decoder", _t("Qwen2Model", "Qwen2Config", **LLAMA), decoder),
    Spec("Qwen3Model", "decoder", _t("Qwen3Model", "Qwen3Config", head_dim=8, **LLAMA), decoder),
    Spec("GemmaModel", "decoder", _t("GemmaModel", "GemmaConfig", head_dim=8, **LLAMA), decoder),
    Spec("MixtralModel", "decoder", _t("MixtralModel", "MixtralConfig", num_local_experts=4, num_experts_per_tok=2,
                                       **LLAMA), decoder, note="mixture of 4 experts, top-2"),
    Spec("PhiModel", "decoder", _t("PhiModel", "PhiConfig", **LLAMA), decoder),
    Spec("GPT2Model", "decoder", _t("GPT2Model", "GPT2Config", vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2,
                                    n_head=4, bos_token_id=1, eos_token_id=2), decoder),
    Spec("GPTNeoXModel", "decoder", _t("GPTNeoXModel", "GPTNeoXConfig", **BERT), decoder),
    Spec("OPTModel", "decoder", _t("OPTModel", "OPTConfig", vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, ffn_dim=64, max_position_embeddings=64,
                                   word_embed_proj_dim=32), decoder),
    Spec("FalconModel", "decoder", _t("FalconModel", "FalconConfig", vocab_size=VOCAB, hidden_size=32,
                                      num_hidden_layers=2, num_attention_heads=4), decoder),
    Spec("BloomModel", "decoder", _t("BloomModel", "BloomConfig", vocab_size=VOCAB, hidden_size=32, n_layer=2,
                                     n_head=4), decoder, note="ALiBi"),
    # ---- encoder-decoders
    Spec("T5Model", "encoder-decoder", _t("T5Model", "T5Config", vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64,
                                          num_layers=2, num_heads=4), seq2seq),
    Spec("T5EncoderModel", "encoder", _t("T5EncoderModel", "T5Config", vocab_size=VOCAB, d_model=32, d_kv=8,
                                                 d_ff=64, num_layers=2, num_heads=4), text, note="encoder only"),
    Spec("BartModel", "encoder-decoder", _t("BartModel", "BartConfig", **BART), seq2seq_shifted,
         note="no decoder_input_ids: shifted from input_ids"),
    Spec("MBartModel", "encoder-decoder", _t("MBartModel", "MBartConfig", **BART), seq2seq_shifted,
         note="no decoder_input_ids: shifted from input_ids"),
    Spec("MarianModel", "encoder-decoder", _t("MarianModel", "MarianConfig", decoder_start_token_id=1,
                                              pad_token_id=1, **BART), seq2seq),
    Spec("PegasusModel", "encoder-decoder", _t("PegasusModel", "PegasusConfig", **BART), seq2seq),
    Spec("M2M100Model", "encoder-decoder", _t("M2M100Model", "M2M100Config", **BART), seq2seq),
    Spec("BlenderbotSmallModel", "encoder-decoder", _t("BlenderbotSmallModel", "BlenderbotSmallConfig", **BART),
         seq2seq),
    # ---- audio
    Spec("Wav2Vec2Model", "audio", _t("Wav2Vec2Model", "Wav2Vec2Config", **W2V), waveform(1600),
         note="1600 samples"),
    Spec("HubertModel", "audio", _t("HubertModel", "HubertConfig", **W2V), waveform(1600), note="1600 samples"),
    Spec("WavLMModel", "audio", _t("WavLMModel", "WavLMConfig", num_buckets=32, max_bucket_distance=64, **W2V),
         waveform(1600), note="1600 samples"),
    Spec("Data2VecAudioModel", "audio", _t("Data2VecAudioModel", "Data2VecAudioConfig", **W2V), waveform(1600),
         note="1600 samples"),
    Spec("WhisperModel", "audio", _t("WhisperModel", "WhisperConfig", vocab_size=VOCAB, num_mel_bins=16, d_model=32,
                                     encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                     max_source_positions=32, max_target_positions=32, pad_token_id=1,
                                     bos_token_id=1, eos_token_id=2, decoder_start_token_id=1),
         lambda b, g: ((), {"input_features": torch.randn(b, 16, 64, generator=g),
                            "decoder_input_ids": _ids(b, DEC_SEQ, g), "use_cache": False}),
         note="16 mel bins x 64 frames"),
    Spec("ASTModel", "audio", _t("ASTModel", "ASTConfig", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, patch_size=8, num_mel_bins=32, max_length=32,
                                 frequency_stride=8, time_stride=8),
         lambda b, g: ((), {"input_values": torch.randn(b, 32, 32, generator=g)}), note="32 frames x 32 mel bins"),
    # ---- vision
    Spec("ViTModel", "vision", _t("ViTModel", "ViTConfig", **VIT), image(32)),
    Spec("DeiTModel", "vision", _t("DeiTModel", "DeiTConfig", **VIT), image(32)),
    Spec("BeitModel", "vision", _t("BeitModel", "BeitConfig", use_relative_position_bias=True, vocab_size=VOCAB,
                                   **VIT), image(32), note="relative position bias"),
    Spec("Dinov2Model", "vision", _t("Dinov2Model", "Dinov2Config", **VIT), image(32)),
    Spec("SwinModel", "vision", _t("SwinModel", "SwinConfig", image_size=32, patch_size=4, embed_dim=16,
                                   depths=[1, 1], num_heads=[2, 2], window_size=4), image(32)),
    Spec("ConvNextModel", "vision", _t("ConvNextModel", "ConvNextConfig", hidden_sizes=[16, 32], depths=[1, 1],
                                       num_stages=2), image(32)),
    Spec("ResNetModel", "vision", _t("ResNetModel", "ResNetConfig", embedding_size=16, hidden_sizes=[16, 32],
                                     depths=[1, 1], layer_type="basic"), image(32)),
    Spec("RegNetModel", "vision", _t("RegNetModel", "RegNetConfig", embedding_size=16, hidden_sizes=[16, 32],
                                     depths=[1, 1], groups_width=8), image(32)),
    # initializer_range 0.65: at the default 0.02 the narrow model's activations underflow to exactly 0
    Spec("EfficientNetModel", "vision", _t("EfficientNetModel", "EfficientNetConfig", image_size=32,
                                           width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320,
                                           initializer_range=0.65), image(32), note="initializer_range 0.65"),
    # initializer_range 0.3: at the default 0.02 this narrow model's activations underflow to exactly 0
    Spec("MobileViTModel", "vision", _t("MobileViTModel", "MobileViTConfig", image_size=64, hidden_sizes=[16, 24, 32],
                                        neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64], num_attention_heads=2,
                                        initializer_range=0.3),
         image(64), note="initializer_range 0.3"),
    Spec("SegformerModel", "vision", _t("SegformerModel", "SegformerConfig", num_encoder_blocks=2, depths=[1, 1],
                                        sr_ratios=[2, 1], hidden_sizes=[16, 32], num_attention_heads=[1, 2],
                                        patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2]), image(32)),
    Spec("PoolFormerModel", "vision", _t("PoolFormerModel", "PoolFormerConfig", num_encoder_blocks=2, depths=[1, 1],
                                         hidden_sizes=[16, 32], patch_sizes=[7, 3], strides=[4, 2],
                                         padding=[2, 1]), image(32)),
    Spec("CLIPVisionModel", "vision", _t("CLIPVisionModel", "CLIPVisionConfig", image_size=32, **{
        k: v for k, v in VIT.items() if k != "image_size"}), image(32)),
]


# --------------------------------------------------------------------------- timm

#: (family, the smallest variant). Families are architectures: several may share a timm module
#: (mixnet and mnasnet live in timm.models.efficientnet); the table names the module too.
TIMM_MODELS: list[tuple[str, str]] = [
    ("resnet", "resnet18"), ("efficientnet", "efficientnet_b0"), ("efficientnetv2", "efficientnetv2_rw_t"),
    ("mobilenetv2", "mobilenetv2_050"), ("mobilenetv3", "mobilenetv3_small_050"),
    ("mobilenetv4", "mobilenetv4_conv_small_050"), ("mixnet", "mixnet_s"), ("mnasnet", "mnasnet_small"),
    ("lcnet", "lcnet_050"), ("convnext", "convnext_atto"), ("vit", "vit_tiny_patch16_224"),
    ("deit", "deit_tiny_patch16_224"), ("swin", "swin_tiny_patch4_window7_224"), ("maxvit", "maxvit_tiny_rw_224"),
    ("inception_v3", "inception_v3"), ("inception_v4", "inception_v4"), ("regnet", "regnetx_002"),
    ("densenet", "densenet121"), ("ghostnet", "ghostnet_050"), ("levit", "levit_128s"), ("coat", "coat_lite_tiny"),
    ("poolformer", "poolformer_s12"), ("dla", "dla46_c"), ("dpn", "dpn48b"), ("hrnet", "hrnet_w18_small"),
    ("res2net", "res2net50_14w_8s"), ("resnest", "resnest14d"), ("rexnet", "rexnet_100"),
    ("cspnet", "cs3darknet_s"), ("vovnet", "ese_vovnet19b_slim_dw"), ("selecsls", "selecsls42b"),
    ("hardcorenas", "hardcorenas_a"), ("xception", "xception41"), ("nfnet", "nf_regnet_b0"),
    ("edgenext", "edgenext_xx_small"), ("mobilevit", "mobilevit_xxs"), ("efficientformer", "efficientformer_l1"),
    ("efficientformerv2", "efficientformerv2_s0"), ("pit", "pit_ti_224"), ("crossvit", "crossvit_tiny_240"),
    ("cait", "cait_xxs24_224"), ("xcit", "xcit_nano_12_p16_224"), ("mlp_mixer", "mixer_s32_224"),
    ("repvgg", "repvgg_a0"), ("fastvit", "fastvit_t8"), ("efficientvit (MIT)", "efficientvit_b0"),
    ("efficientvit (MSRA)", "efficientvit_m0"), ("sequencer", "sequencer2d_s"), ("visformer", "visformer_tiny"),
    ("twins", "twins_svt_small"), ("pvt_v2", "pvt_v2_b0"), ("gcvit", "gcvit_xxtiny"), ("convit", "convit_tiny"),
    ("tiny_vit", "tiny_vit_5m_224"), ("hgnet", "hgnetv2_b0"), ("repghost", "repghostnet_050"),
    ("starnet", "starnet_s1"), ("mambaout", "mambaout_femto"), ("botnet", "botnet26t_256"),
    ("senet", "legacy_seresnet18"), ("hiera", "hiera_tiny_224"), ("focalnet", "focalnet_tiny_srf"),
    ("volo", "volo_d1_224"), ("eva", "eva02_tiny_patch14_224"), ("rdnet", "rdnet_tiny"),
    ("nextvit", "nextvit_small"), ("davit", "davit_tiny"), ("inception_next", "inception_next_tiny"),
    ("tnt", "tnt_s_patch16_224"), ("nest", "nest_tiny_jx"),
]


def timm_spec(family: str, name: str) -> Spec:
    """The row of a timm model: its input size comes from its pretrained config, read when built."""
    def build() -> torch.nn.Module:
        import timm

        return timm.create_model(name, pretrained=False)

    return Spec(name, family, build, timm_image(TIMM_SMALL))  # the size is fixed up by timm_input_size()


def timm_input_size(model: torch.nn.Module) -> int:
    """:data:`TIMM_SMALL` for a model that takes any size, else its fixed input size."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("fixed_input_size"):
        return int(cfg["input_size"][-1])
    return TIMM_SMALL


TIMM: list[Spec] = [timm_spec(f, n) for f, n in TIMM_MODELS]

SETS: dict[str, list[Spec]] = {"hf": HF, "timm": TIMM}


def spec(kind: str, name: str) -> Spec:
    return next(s for s in SETS[kind] if s.name == name)
