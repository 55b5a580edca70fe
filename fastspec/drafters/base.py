"""The drafter protocol: how the engine talks to anything that proposes tokens.

One request (a batch of rows) goes through:

    drafter.begin(request)               # once: source/prompt, sampling settings
    loop:
        out = drafter.draft(step)        # γ tokens per row (+ q unless deterministic)
        ... target verifies ...
        drafter.commit(result)           # accepted prefix + 1 target token per row;
                                         # stateful drafters roll caches back here
    drafter.end()

Rows are independent: every tensor has the batch dimension first, and rows may have
generated different numbers of tokens (ragged acceptance).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass(frozen=True)
class SamplingParams:
    """The target's processing, which a stochastic drafter must also apply to its q."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    repetition_penalty: float = 1.0  # 1.0 = off


@dataclass
class DraftRequest:
    """What a drafter learns once per request.

    source_ids: [B,S] the encoder input ids for seq2seq targets, the prompt for causal ones;
        None when the target has no token source (e.g. Whisper reads input_features).
    source_mask: [B,S] 1 for real tokens (left or right padding allowed); None with source_ids.
    is_encoder_decoder: True for seq2seq targets: the target's output starts at the
        decoder start token, not at the prompt.
    decoder_start_token_id: first output token for seq2seq targets (else None).
    vocab_size: the target's vocabulary size.
    sampling: the target's processing settings.
    generator: the request's torch.Generator (seeded by ``seed``), or None.
    batch_size / device: the rows and where the engine's tensors live (taken from source_ids
        when not given).
    decoder_prompt_ids / decoder_prompt_mask: [B,P] seq2seq only: the decoder's prompt (the start
        token, or the caller's ``decoder_input_ids``), any padding side; None otherwise.
    encoder_hidden_states: [B,S,H] seq2seq targets, only for a drafter that sets
        ``hidden_state_layers``: the target encoder's last hidden state (computed once), with
        ``source_mask`` [B,S] as its mask; None otherwise (causal targets, or no features wanted).
    """

    source_ids: Optional[torch.Tensor]
    source_mask: Optional[torch.Tensor]
    is_encoder_decoder: bool
    vocab_size: int
    decoder_start_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None
    eos_token_id: Optional[list] = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    generator: Optional[torch.Generator] = None
    batch_size: Optional[int] = None
    device: Optional[torch.device] = None
    decoder_prompt_ids: Optional[torch.Tensor] = None
    decoder_prompt_mask: Optional[torch.Tensor] = None
    encoder_hidden_states: Optional[torch.Tensor] = None

    def __post_init__(self):
        if self.batch_size is None:
            if self.source_ids is None:
                raise ValueError("DraftRequest needs batch_size when source_ids is None")
            self.batch_size = int(self.source_ids.shape[0])
        if self.device is None:
            self.device = self.source_ids.device if self.source_ids is not None else torch.device("cpu")


@dataclass
class DraftStep:
    """The state before one draft call.

    generated: [B,G] tokens each row has emitted so far (excluding the prompt and the
        decoder start token), right-padded with -1.
    num_generated: [B] int64 valid length of each row of ``generated``.
    active: [B] bool, False for rows that have finished (their drafts are ignored).
    gamma: how many tokens to draft per row.
    """

    generated: torch.Tensor
    num_generated: torch.Tensor
    active: torch.Tensor
    gamma: int


@dataclass
class DraftOutput:
    """tokens: [B,k] int64 in [0, V) with 0 ≤ k ≤ γ.  probs: [B,k,V] float32 q, or None if deterministic.

    k < γ means the drafter declines to guess further this step (k = 0: a plain target step);
    the engine then verifies only k + 1 positions, which is cheaper and equally lossless.
    """

    tokens: torch.Tensor
    probs: Optional[torch.Tensor] = None


@dataclass
class CommitInfo:
    """The verify result for one step.

    output_tokens: [B,γ+1] int64: accepted drafts then the recovered/bonus token, -1 padded.
    num_accepted: [B] int64 accepted draft tokens per row (inactive rows: 0 and ignored).
    active: [B] bool rows that took part in this step.
    hidden_states / num_hidden: only for a drafter that sets ``hidden_state_layers`` (else None).
        hidden_states [B,K,H'] (target dtype) and num_hidden [B] int64: for row b, the features of
        the next ``num_hidden[b]`` positions of that row's decoder sequence, in order, left-aligned,
        zero padded. The decoder sequence of a row: causal = its real prompt tokens then its
        generated tokens; seq2seq = the decoder start token (or decoder prompt) then generated
        tokens. The feature at position i is the target's hidden state whose logits predict token
        i+1 (the selected layers of HF's ``hidden_states`` concatenated on the last dim:
        H' = len(layers)·H). Every position's feature is handed exactly once, in order, starting
        at position 0; the newest committed token (the recovered/bonus one) gets its feature in
        the next step's commit. So after a commit the drafter has features for all of the row's
        sequence except its last token. Inactive rows: num_hidden 0.
    """

    output_tokens: torch.Tensor
    num_accepted: torch.Tensor
    active: torch.Tensor
    hidden_states: Optional[torch.Tensor] = None
    num_hidden: Optional[torch.Tensor] = None


class Drafter:
    """Base class. Subclasses set ``deterministic`` (True: draft returns probs=None and
    the verifier treats q as one-hot) and implement ``draft``.

    hidden_state_layers: None (the default: no features wanted, so the drafter pays nothing), or
        indices into HF's ``outputs.hidden_states`` tuple (0 = embeddings, −1 = last, after the
        final norm for Llama and T5), e.g. ``(-1,)`` or ``(2, 15, 27)``. Then the engine runs the
        target's prefill and verify forwards with ``output_hidden_states=True``, concatenates the
        selected layers on the last dim (H' = len(layers)·H) and hands them in
        ``CommitInfo.hidden_states``/``num_hidden`` (seq2seq: also
        ``DraftRequest.encoder_hidden_states``). A row with no features yet (the first step of a
        request) should draft nothing: tokens [B,0], and the engine runs a plain target step.
    """

    deterministic: bool = True
    vocab_size: Optional[int] = None  # None = adapts to the target's vocabulary
    hidden_state_layers: Optional[tuple] = None  # target layers to receive as features (see above)

    def begin(self, request: DraftRequest) -> None:
        self.request = request

    def draft(self, step: DraftStep) -> DraftOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def commit(self, info: CommitInfo) -> None:
        """Stateless drafters need nothing here; stateful ones roll back their caches."""

    def end(self) -> None:
        self.request = None
