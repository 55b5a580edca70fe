"""FeatureDrafter: an EAGLE-style drafter that reads the target's hidden states.

Model (EAGLE-1, with EAGLE-3's fused features and shortlisted head as options)::

    g_i  = f_i                            feature_layers = (-1,): the target's last hidden state
         | Linear(n·h→h)(f_i)             feature_layers = (2, L/2, L-3): low/mid/high fused (EAGLE-3)
    x_i  = Linear(2h→h)([emb(t_{i+1}) ; g_i])     emb = the target's own input embeddings, frozen
    f̂_{i+1} = one decoder layer(x_≤i)     Llama-style for causal targets; a T5 decoder block that
                                          cross-attends to the target's encoder states for seq2seq
    logits(t_{i+2}) = head(f̂_{i+1})      head = the target's LM-head rows of a shortlist of N ids

f̂ is trained to match the target's LAST hidden state at i+1 (HF returns it after the final norm
for Llama and T5, so the head is the LM-head rows alone, no norm). Drafting is autoregressive in
feature space: (f̂_{n-1}, emb(d1)) → f̂_n → d2, ... Training lives in :mod:`fastspec.distill.feature`.

The head covers a shortlist of target ids (``shortlist_ids``, the draft→target map). q is placed
on the FULL vocabulary (0 outside the shortlist) via ``ops.process_logits`` of the logits with −inf
outside the shortlist, with the target's processing, so speculative sampling stays exact.

Feature protocol (fields of :mod:`fastspec.drafters.base`, filled by the engine):

* ``Drafter.hidden_state_layers: Optional[tuple] = None`` (None = no features wanted, so other
  drafters pay nothing). A FeatureDrafter sets e.g. ``(-1,)`` or ``(2, 15, 27)``: indices into HF's
  ``outputs.hidden_states`` tuple (0 = embeddings, −1 = last, after the final norm for Llama). The
  engine concatenates the selected layers on the last dim: H' = len(layers)·H.
* ``DraftRequest.encoder_hidden_states`` [B,S,H] (seq2seq: the target encoder's last hidden state,
  computed once) with ``DraftRequest.source_mask`` [B,S] as its mask; None for causal targets.
* ``CommitInfo.hidden_states`` [B,K,H'] (target dtype) and ``CommitInfo.num_hidden`` [B] int64:
  for row b, the features of the next ``num_hidden[b]`` positions of that row's decoder sequence,
  in order, left-aligned, zero padded. The decoder sequence of a row: causal = its real prompt
  tokens then its generated tokens; seq2seq = the decoder start token (or decoder prompt) then
  generated tokens. The feature at position i is the target's hidden state whose logits predict
  token i+1. Every position's feature is handed exactly once, in order, starting at position 0;
  the newest committed token (the recovered/bonus one) gets its feature in the next step's commit.
  So after a commit the drafter has features for all of the row's sequence except its last token.
* A row with no features yet (the first step of a request) drafts nothing: ``draft`` returns
  tokens [B,0] and the engine runs a plain target step.

KV cache: one slot per processed position, per row, with its logical position (``-1`` = empty).
Draft slots are dropped at commit (they used predicted features); ragged blocks leave empty slots
that the attention mask skips and that are compacted away once they dominate. RoPE (Llama) is
applied with each slot's logical position and T5's relative bias is computed from them, so the
slot layout never changes the result.
"""
from __future__ import annotations

import inspect
from typing import Optional, Sequence

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache

from fastspec import introspect, ops
from fastspec.drafters.base import CommitInfo, DraftOutput, Drafter, DraftRequest, DraftStep
from fastspec.drafters.context import decoder_prefix
from fastspec.drafters.folder import load_folder, save_folder
from fastspec.drafters.shortlist import check_shortlist, to_vocab
from fastspec.errors import UserError
from fastspec.skinny_linear import to_skinny

KIND = "feature"
DEFAULT_LAYERS = (-1,)
# The threshold `fastspec train --drafter feature` saves with the drafter (load() applies it): at 0.4
# the drafter alone went 0.74x -> 0.99x of AR and as prompt lookup's fallback 1.24x -> 1.42x (SmolLM2,
# aclsum, γ 6, fp32; stop 16 at γ 4: 0.62x -> 0.84x, 0.89x -> 0.97x). bench/RESULTS.md.
TRAINED_CONFIDENCE_THRESHOLD = 0.4


def eagle3_layers(num_layers: int) -> tuple:
    """EAGLE-3's low/mid/high layers (2, L/2, L−3) as indices into ``outputs.hidden_states``."""
    if num_layers < 4:
        raise UserError(f"fused features need a target with ≥ 4 layers, this one has {num_layers}")
    return (2, num_layers // 2, num_layers - 3)


class RowKV(Cache):
    """The drafter layer's self-attention keys/values [B,Hkv,W,d], one slot per processed position.

    Only ``update``/``get_seq_length`` are used by the HF attention modules; the drafter keeps the
    slot positions and masks itself, so no HF cache internals are touched."""

    def __init__(self):
        super().__init__(layers=[])
        self.keys: Optional[torch.Tensor] = None
        self.values: Optional[torch.Tensor] = None

    def update(self, key_states, value_states, layer_idx=0, *args, **kwargs):
        if self.keys is None:
            self.keys, self.values = key_states, value_states
        else:
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
        return self.keys, self.values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.keys is None else int(self.keys.shape[-2])

    def truncate(self, width: int) -> None:
        if self.keys is not None:
            self.keys, self.values = self.keys[..., :width, :], self.values[..., :width, :]

    def gather_slots(self, index: torch.Tensor) -> None:
        """index [B,W'] slot ids per row: keep those slots, in that order."""
        if self.keys is None:
            return
        idx = index[:, None, :, None].expand(-1, self.keys.shape[1], -1, self.keys.shape[-1])
        self.keys, self.values = self.keys.gather(2, idx), self.values.gather(2, idx)


def _layer_config(model) -> tuple:
    """(arch, config dict) of the drafter's one decoder layer, built from the target's config."""
    from transformers import LlamaConfig, T5Config

    text = introspect.text_config(model)
    if introspect.is_encoder_decoder(model):
        if getattr(text, "model_type", "") not in ("t5", "mt5", "umt5"):
            raise UserError(f"FeatureDrafter supports T5-family seq2seq targets, not {text.model_type!r}")
        config = T5Config.from_dict({**text.to_dict(), "is_decoder": True, "num_layers": 1,
                                     "num_decoder_layers": 1, "dropout_rate": 0.0, "use_cache": True})
        return "t5", config.to_dict()
    hidden = int(text.hidden_size)
    heads = int(text.num_attention_heads)
    fields = dict(
        vocab_size=int(text.vocab_size), hidden_size=hidden, num_hidden_layers=1, num_attention_heads=heads,
        num_key_value_heads=int(getattr(text, "num_key_value_heads", None) or heads),
        intermediate_size=int(getattr(text, "intermediate_size", None) or 4 * hidden),
        head_dim=int(getattr(text, "head_dim", None) or hidden // heads),
        rms_norm_eps=float(getattr(text, "rms_norm_eps", None) or 1e-6),
        max_position_embeddings=int(introspect.max_positions(model) or 4096),
        hidden_act=str(getattr(text, "hidden_act", "silu")),
        attention_bias=bool(getattr(text, "attention_bias", False)), mlp_bias=bool(getattr(text, "mlp_bias", False)),
    )
    rope = getattr(text, "rope_parameters", None)
    if isinstance(rope, dict) and rope.get("rope_type", "default") == "default":
        fields["rope_parameters"] = dict(rope)
    return "llama", LlamaConfig(**fields).to_dict()


def _cache_kwarg(layer: nn.Module) -> str:
    # transformers ≥ 5.2x names it ``cache``; older releases ``past_key_values``
    return "cache" if "cache" in inspect.signature(layer.forward).parameters else "past_key_values"


class FeatureModel(nn.Module):
    """The trainable part: feature fusion, input projection, one decoder layer, shortlist head.

    The target's input embeddings are attached (:meth:`attach_target`), frozen and not saved.
    """

    def __init__(self, config: dict):
        super().__init__()
        from transformers import LlamaConfig, T5Config

        self.config = dict(config)
        self.arch = config["arch"]
        self.hidden_size = h = int(config["hidden_size"])
        self.vocab_size = int(config["vocab_size"])
        self.feature_layers = tuple(int(i) for i in config["feature_layers"])
        n = len(self.feature_layers)
        self.fuse = nn.Linear(n * h, h, bias=False) if n > 1 else None
        self.fc = nn.Linear(2 * h, h, bias=True)
        if self.arch == "llama":
            from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

            layer_config = LlamaConfig.from_dict(config["layer_config"])
            layer_config._attn_implementation = "sdpa"
            self.layer = LlamaDecoderLayer(layer_config, layer_idx=0)
            self.rotary = LlamaRotaryEmbedding(layer_config)
        elif self.arch == "t5":
            from transformers.models.t5.modeling_t5 import T5Block

            layer_config = T5Config.from_dict(config["layer_config"])
            layer_config._attn_implementation = "eager"  # the relative bias is passed in as position_bias
            self.layer = T5Block(layer_config, has_relative_attention_bias=True, layer_idx=0)
        else:
            raise UserError(f"unknown feature-drafter architecture {self.arch!r}")
        self._cache_kwarg = _cache_kwarg(self.layer)
        size = int(config["shortlist_size"])
        self.head = nn.Linear(h, size, bias=False)
        self.register_buffer("shortlist_ids", torch.arange(size, dtype=torch.long))  # draft id -> target id
        self.__dict__["_embed"] = None  # the target's module: not a submodule, never saved
        to_skinny(self)  # its 1-row draft steps on the native kernel; training (autograd) stays nn.Linear

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_target(cls, target, feature_layers: Sequence[int] = DEFAULT_LAYERS, shortlist=None) -> "FeatureModel":
        """A model for ``target``; the head starts as the target's LM-head rows of ``shortlist``
        ([N] target ids, most frequent first; None = the full vocabulary)."""
        model = introspect.hf_model(target)
        arch, layer_config = _layer_config(model)
        vocab = introspect.vocab_size(model)
        hidden = int(introspect.text_config(model).hidden_size)
        layers = tuple(int(i) for i in feature_layers)
        total = _num_decoder_layers(model)
        if not layers or any(not -(total + 1) <= i <= total for i in layers):
            raise UserError(f"feature_layers {layers} must index hidden_states of a target with {total} layers "
                            f"(0 = embeddings .. {total}, or negative)")
        ids = torch.arange(vocab) if shortlist is None else check_shortlist(shortlist, vocab)
        config = {"arch": arch, "hidden_size": hidden, "vocab_size": vocab, "feature_layers": list(layers),
                  "layer_config": layer_config, "shortlist_size": int(ids.numel())}
        out = cls(config)
        lm_head = model.get_output_embeddings().weight.detach()
        # T5 with a tied head scales the last hidden state by d_model^-0.5 before the head: fold it in
        scale = hidden ** -0.5 if arch == "t5" and getattr(model.config, "scale_decoder_outputs", False) else 1.0
        with torch.no_grad():
            out.head.weight.copy_(lm_head[ids.to(lm_head.device)].float().cpu() * scale)
            out.shortlist_ids.copy_(ids)
        out.attach_target(model)
        return out.to(device=introspect.model_device(model))

    def attach_target(self, target) -> None:
        """Use ``target``'s input embeddings (frozen); its vocabulary and width must match."""
        model = introspect.hf_model(target)
        vocab, hidden = introspect.vocab_size(model), int(introspect.text_config(model).hidden_size)
        if (vocab, hidden) != (self.vocab_size, self.hidden_size):
            raise UserError(f"this feature drafter was built for a target with vocabulary {self.vocab_size} and "
                            f"hidden size {self.hidden_size}; the given target has {vocab} and {hidden}")
        embed = model.get_input_embeddings()
        for p in embed.parameters():
            p.requires_grad_(False)
        self.__dict__["_embed"] = embed

    def config_dict(self) -> dict:
        return dict(self.config)

    # ------------------------------------------------------------------ pieces
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [...] (−1 = pad, reads row 0) -> frozen target embeddings [..., h] in the model's dtype."""
        if self._embed is None:
            raise UserError("attach the target first (FeatureDrafter.load(folder, target=...))")
        return self._embed(ids.clamp(min=0)).to(self.fc.weight.dtype)

    def fuse_features(self, features: torch.Tensor) -> torch.Tensor:
        """features [..., n·h] (the engine's concatenated layers) -> g [..., h]."""
        features = features.to(self.fc.weight.dtype)
        return self.fuse(features) if self.fuse is not None else features

    def step_input(self, g: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
        """g [B,q,h] features of positions i, next_ids [B,q] tokens i+1 -> layer input [B,q,h]."""
        return self.fc(torch.cat([self.embed(next_ids), g], dim=-1))

    def new_cache(self) -> RowKV:
        return RowKV()

    def run_layer(self, x, q_pos, key_pos, allowed, kv: RowKV, cross=None, encoder=None, encoder_mask=None):
        """One decoder-layer pass over q new slots appended to ``kv``.

        x: [B,q,h]; q_pos: [B,q] logical positions of the new slots (≥ 0); key_pos: [B,W+q] logical
        positions of all slots after the append; allowed: [B,q,W+q] bool, which slots each query
        may read; cross: a DynamicCache holding the encoder keys (T5, filled on first use);
        encoder: [B,S,h] and encoder_mask [B,S] (T5). Returns the predicted features [B,q,h].
        """
        low = torch.finfo(x.dtype).min
        mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(~allowed, low)[:, None]
        if self.arch == "llama":
            cos_sin = self.rotary(x, q_pos)
            return self.layer(x, attention_mask=mask, position_ids=q_pos, position_embeddings=cos_sin,
                              **{self._cache_kwarg: kv})
        attn = self.layer.layer[0].SelfAttention
        buckets = attn._relative_position_bucket(
            key_pos[:, None, :] - q_pos[:, :, None], bidirectional=False,
            num_buckets=attn.relative_attention_num_buckets, max_distance=attn.relative_attention_max_distance)
        bias = attn.relative_attention_bias(buckets).permute(0, 3, 1, 2).to(x.dtype) + mask  # [B,H,q,W+q]
        enc_bias = None
        if encoder_mask is not None:
            enc_bias = torch.zeros(encoder_mask.shape, dtype=x.dtype, device=x.device)
            enc_bias = enc_bias.masked_fill(encoder_mask == 0, low)[:, None, None, :]
        cache = EncoderDecoderCache(kv, cross if cross is not None else DynamicCache())
        out = self.layer(x, position_bias=bias, encoder_hidden_states=encoder.to(x.dtype),
                         encoder_attention_mask=enc_bias, **{self._cache_kwarg: cache})
        return out[0]


def _num_decoder_layers(model) -> int:
    text = introspect.text_config(model)
    for name in ("num_decoder_layers", "num_hidden_layers", "num_layers", "n_layer"):
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise UserError(f"cannot tell how many decoder layers {type(model).__name__} has")


class FeatureDrafter(Drafter):
    """EAGLE-style drafter over the target's hidden states (see the module docstring).

    Build with :meth:`from_target` (then train with ``fastspec.distill.feature``) or :meth:`load`.
    """

    kind = KIND
    deterministic = False  # greedy: argmax drafts, probs None; sampling: q returned
    hidden_state_layers: Optional[tuple] = DEFAULT_LAYERS
    drafts_from_commits = True  # drafts from its own cache fed by commit, not from DraftStep.generated

    def __init__(self, model: FeatureModel, confidence_threshold: float = 0.0):
        """``confidence_threshold``: stop drafting at the first position where every active row's
        top draft probability is < threshold (like HF's ``assistant_confidence_threshold``): unsure
        drafts cost verify width and drafter steps and are mostly rejected. 0 = always draft γ."""
        if not 0.0 <= float(confidence_threshold) < 1.0:
            raise ValueError(f"confidence_threshold must be in [0, 1), got {confidence_threshold}")
        self.model = model.eval()
        self.vocab_size = model.vocab_size
        self.hidden_state_layers = model.feature_layers
        self.confidence_threshold = float(confidence_threshold)
        self.request = None

    @classmethod
    def from_target(cls, target, *, feature_layers: Sequence[int] = DEFAULT_LAYERS, shortlist=None) -> "FeatureDrafter":
        return cls(FeatureModel.from_target(target, feature_layers, shortlist))

    # ------------------------------------------------------------------ protocol
    def begin(self, request: DraftRequest) -> None:
        super().begin(request)
        if request.vocab_size != self.vocab_size:
            raise UserError(f"feature drafter vocabulary {self.vocab_size} != target vocabulary {request.vocab_size}")
        model = self.model
        self._device = model.fc.weight.device
        batch = int(request.batch_size)
        encoder = request.encoder_hidden_states
        if model.arch == "t5":
            if encoder is None:
                raise UserError("a seq2seq feature drafter needs DraftRequest.encoder_hidden_states")
            self._encoder = encoder.to(self._device)  # [B,S,h]
            mask = request.source_mask if request.source_mask is not None else torch.ones(encoder.shape[:2])
            self._encoder_mask = mask.to(self._device)  # [B,S]
        else:
            self._encoder = self._encoder_mask = None
        seq, lengths = decoder_prefix(request)  # the row's decoder sequence so far
        self._seq = seq.to(self._device)  # [B,C] left-aligned, -1 padded
        self._len = lengths.to(self._device)  # [B]
        self._num_feat = torch.zeros(batch, dtype=torch.long, device=self._device)  # real positions processed
        self._last = torch.zeros(batch, model.hidden_size, dtype=model.fc.weight.dtype, device=self._device)
        self._kv = model.new_cache()
        self._cross = DynamicCache() if model.arch == "t5" else None
        self._slot_pos = torch.zeros(batch, 0, dtype=torch.long, device=self._device)  # [B,W], -1 = empty
        self._drafted = 0  # draft slots at the end of the cache
        self._pending = []  # (features [B,K,H'], count [B]) handed by commits, not yet run
        self._num_pending = torch.zeros(batch, dtype=torch.long, device=self._device)

    def end(self) -> None:
        self._kv = self._cross = self._encoder = self._seq = None
        self._pending = []
        super().end()

    def _forward(self, x: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
        """Append q slots (x [B,q,h], q_pos [B,q] with −1 for padding) and return the layer output."""
        q = x.shape[1]
        key_pos = torch.cat([self._slot_pos, q_pos], dim=1)  # [B,W+q]
        allowed = (key_pos[:, None, :] >= 0) & (key_pos[:, None, :] <= q_pos[:, :, None])
        # every query reads at least its own slot (padding queries too: no empty softmax rows)
        allowed[:, :, -q:] |= torch.eye(q, dtype=torch.bool, device=x.device)
        out = self.model.run_layer(x, q_pos.clamp(min=0), key_pos.clamp(min=0), allowed, self._kv, self._cross,
                                   self._encoder, self._encoder_mask)
        self._slot_pos = key_pos
        return out

    def _ready(self) -> torch.Tensor:
        """[B] rows whose features cover all but their last token."""
        return (self._num_feat > 0) & (self._num_feat == self._len - 1)

    def draft(self, step: DraftStep) -> DraftOutput:
        """Up to γ tokens per row: argmax over the shortlist (greedy) or sampled from q (returned)."""
        batch, gamma = self._len.shape[0], int(step.gamma)
        active = step.active.to(self._device).bool()
        self._run_pending()
        if gamma == 0 or not bool((self._ready() | ~active).all()):
            return DraftOutput(tokens=torch.zeros(batch, 0, dtype=torch.long, device=self._device))
        sampling = self.request.sampling if self.request.sampling.do_sample else None
        context = self._context() if sampling is not None else None  # [B,L] repetition-penalty history
        tokens, probs = [], []
        feature = self._last  # [B,h] f̂ for each row's last token
        with torch.no_grad():
            for s in range(gamma):
                logits = self.model.head(feature)  # [B,N]
                token, q = self._choose(logits, context, sampling)
                if self.confidence_threshold and not self._confident(logits, q, active):
                    break
                tokens.append(token)
                if q is not None:
                    probs.append(q)
                    context = torch.cat([context, token[:, None]], dim=1)
                if s + 1 == gamma:
                    break
                x = self.model.step_input(feature[:, None], token[:, None])  # [B,1,h]
                feature = self._forward(x, (self._num_feat + s)[:, None])[:, 0]
                self._drafted += 1
        if not tokens:
            return DraftOutput(tokens=torch.zeros(batch, 0, dtype=torch.long, device=self._device))
        return DraftOutput(tokens=torch.stack(tokens, 1), probs=torch.stack(probs, 1) if probs else None)

    def _confident(self, short_logits: torch.Tensor, q, active: torch.Tensor) -> bool:
        """Whether some active row's top probability is ≥ the threshold (greedy: softmax over the
        shortlist; sampling: the processed q). The top probability, not the drawn token's: a
        decision that looked at the drawn token would skew the drafts away from q (not lossless)."""
        probs = torch.softmax(short_logits.float(), dim=-1) if q is None else q
        return bool(((probs.amax(-1) >= self.confidence_threshold) & active).any())

    def _context(self) -> torch.Tensor:
        width = int(self._len.max())
        columns = torch.arange(width, device=self._device)
        return torch.where(columns < self._len[:, None], self._seq[:, :width], -1)

    def _choose(self, short_logits: torch.Tensor, context, sampling):
        """short_logits [B,N] -> (target ids [B], q [B,V] over the full vocabulary or None)."""
        ids = self.model.shortlist_ids
        if sampling is None:
            return ids[short_logits.argmax(-1)], None
        q = ops.process_logits(to_vocab(short_logits, ids, self.vocab_size), prev_tokens=context, do_sample=True, temperature=sampling.temperature,
                               top_k=sampling.top_k, top_p=sampling.top_p,
                               repetition_penalty=sampling.repetition_penalty)
        return torch.multinomial(q, 1, generator=self.request.generator)[:, 0], q

    def commit(self, info: CommitInfo) -> None:
        """Drop the draft slots, append the committed tokens, and keep the newly handed real
        features for the next draft. Running them through the layer waits until then: one pass
        reads the drafter's weights once for all commits since the last draft (a hybrid's fallback
        drafts on a minority of steps, and inside decoding the weights come from memory each pass)."""
        if self._drafted:
            width = self._slot_pos.shape[1] - self._drafted
            self._kv.truncate(width)
            self._slot_pos = self._slot_pos[:, :width]
            self._drafted = 0
        self._append_tokens(info)
        hidden, num_hidden = info.hidden_states, info.num_hidden
        if hidden is None or num_hidden is None:
            raise UserError("FeatureDrafter needs an engine that passes CommitInfo.hidden_states/num_hidden "
                            f"(it asks for hidden_state_layers={self.hidden_state_layers})")
        num_hidden = num_hidden.to(self._device).long()  # [B]
        if bool((self._num_feat + self._num_pending + num_hidden > self._len - 1).any()):
            raise ValueError("CommitInfo.num_hidden hands features past each row's second-to-last token")
        width = int(num_hidden.max()) if num_hidden.numel() else 0
        if width:
            self._pending.append((hidden[:, :width].to(self._device), num_hidden))
            self._num_pending = self._num_pending + num_hidden

    def last_feature(self) -> torch.Tensor:
        """[B,h] the predicted feature f̂ of each row's last token (after the features committed
        since the last draft have run)."""
        self._run_pending()
        return self._last

    def _run_pending(self) -> None:
        """Run the features handed since the last draft through the layer, each row's in order."""
        if not self._pending:
            return
        total = self._num_pending  # [B]
        width = int(total.max())
        columns = torch.arange(width, device=self._device)
        if len(self._pending) == 1:
            hidden = self._pending[0][0]
        else:  # each row's chunks, left-aligned one after another
            first = self._pending[0][0]
            hidden = first.new_zeros((first.shape[0], width) + tuple(first.shape[2:]))
            offset = torch.zeros_like(total)
            for chunk, num in self._pending:
                cols = torch.arange(chunk.shape[1], device=self._device)
                rows, taken = (cols[None, :] < num[:, None]).nonzero(as_tuple=True)
                hidden[rows, offset[rows] + taken] = chunk[rows, taken]
                offset = offset + num
        self._pending, self._num_pending = [], torch.zeros_like(total)
        valid = columns[None, :] < total[:, None]  # [B,K]
        positions = self._num_feat[:, None] + columns  # [B,K]
        next_ids = self._seq.gather(1, torch.where(valid, positions + 1, 0))  # [B,K] token i+1
        with torch.no_grad():
            g = self.model.fuse_features(hidden)  # [B,K,h]
            out = self._forward(self.model.step_input(g, next_ids), torch.where(valid, positions, -1))
        got = total > 0
        last = out[torch.arange(out.shape[0], device=self._device), (total - 1).clamp(min=0)]  # [B,h]
        self._last = torch.where(got[:, None], last, self._last)
        self._num_feat += total
        self._compact()

    def _append_tokens(self, info: CommitInfo) -> None:
        """Each active row gains output_tokens[b, :num_accepted[b]+1]."""
        out = info.output_tokens.to(self._device).long()  # [B,γ+1]
        count = torch.where(info.active.to(self._device).bool(), info.num_accepted.to(self._device).long() + 1, 0)
        count = torch.minimum(count, (out >= 0).sum(-1))
        need = int((self._len + count).max())
        if need > self._seq.shape[1]:
            pad = torch.full((self._seq.shape[0], need - self._seq.shape[1] + 64), -1, dtype=torch.long,
                             device=self._device)
            self._seq = torch.cat([self._seq, pad], dim=1)
        columns = torch.arange(out.shape[1], device=self._device)
        keep = columns[None, :] < count[:, None]
        rows = torch.arange(out.shape[0], device=self._device)[:, None].expand_as(out)
        self._seq[rows[keep], (self._len[:, None] + columns)[keep]] = out[keep]
        self._len = self._len + count

    def _compact(self) -> None:
        """Drop empty slots once they are more than half the cache (amortised O(1) per token)."""
        filled = self._slot_pos >= 0
        keep = int(filled.sum(1).max())
        if self._slot_pos.shape[1] <= 2 * keep + 16:
            return
        order = torch.argsort((~filled).to(torch.int8), dim=1, stable=True)[:, :keep]  # filled first, in order
        self._kv.gather_slots(order)
        self._slot_pos = self._slot_pos.gather(1, order)

    # ------------------------------------------------------------------ save / load
    def save(self, folder: str) -> None:
        """config.json (with ``confidence_threshold``) + model.safetensors; the target's embeddings are not saved."""
        config = dict(self.model.config_dict(), confidence_threshold=self.confidence_threshold)
        save_folder(folder, KIND, config, self.model.state_dict())

    @classmethod
    def load(cls, folder: str, target=None, dtype: Optional[torch.dtype] = None,
             confidence_threshold: Optional[float] = None) -> "FeatureDrafter":
        """Load a saved drafter and attach ``target``'s embeddings (the target must match).
        ``confidence_threshold``: None = the saved one (0 for folders saved without it)."""
        config, tensors = load_folder(folder, KIND)
        saved_threshold = config.pop("confidence_threshold", 0.0)
        if confidence_threshold is None:
            confidence_threshold = saved_threshold
        if target is None:
            raise UserError("FeatureDrafter.load needs target=: the drafter reads the target's embeddings")
        try:
            model = FeatureModel(config)
            model.load_state_dict(tensors, strict=True)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise UserError(f"corrupted feature drafter in {folder!r}: {type(e).__name__}: {e}") from None
        model.attach_target(target)
        model = model.to(device=introspect.model_device(introspect.hf_model(target)), dtype=dtype)
        return cls(model, confidence_threshold)


__all__ = ["FeatureDrafter", "FeatureModel", "RowKV", "TRAINED_CONFIDENCE_THRESHOLD", "eagle3_layers"]
