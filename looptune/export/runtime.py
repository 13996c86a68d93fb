"""Run a model with a profile's settings through looptune's own runtime."""

from __future__ import annotations

import codecs
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from looptune.errors import LooptuneError
from looptune.export.deployable import Setting, check_model, model_path, read_profile


@dataclass
class ProfiledModel:
    model: object
    tokenizer: object
    knobs: Setting
    profile_path: Path

    def generate(
        self,
        prompt: str,
        on_text: Callable[[str], None] | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> str:
        """Generate from `prompt` with the profile's knobs; `on_text` gets each decoded piece as
        soon as its token exists (streaming). Returns the whole completion."""
        from looptune.model.generate import generate

        if self.tokenizer is None:
            raise LooptuneError("this checkpoint has no tokenizer; it takes token ids only")
        ids = self.tokenizer.encode(prompt)
        if getattr(self.tokenizer, "bos_id", None) is not None:
            ids = [self.tokenizer.bos_id] + ids
        if not ids:
            raise LooptuneError("the prompt is empty")
        limit = self.model.config.max_position_embeddings
        if len(ids) + max_new_tokens > limit:
            raise LooptuneError(
                f"prompt ({len(ids)} tokens) plus max_new_tokens "
                f"({max_new_tokens}) exceeds the model's context of {limit}"
            )
        pieces: list[str] = []

        def emit(piece: str):
            pieces.append(piece)
            if on_text:
                on_text(piece)

        text = _TextStream(self.tokenizer, emit)
        eos = getattr(self.tokenizer, "eos_id", None)
        device = self.model.model.embed_tokens.weight.device
        generate(
            self.model,
            torch.tensor([ids], device=device),
            max_new_tokens,
            loops=self.knobs.loops,
            mode=self.knobs.mode,
            window=self.knobs.window,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop_id=eos,
            on_token=lambda t: None if int(t[0]) == eos else text.push(int(t[0])),
        )
        text.end()
        return "".join(pieces)


class _TextStream:
    """Turns token ids into text as they arrive, never splitting a UTF-8 character."""

    def __init__(self, tokenizer, emit: Callable[[str], None]):
        self.tokenizer, self.emit = tokenizer, emit
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int):
        piece = self.decoder.decode(self.tokenizer.token_bytes(token_id))
        if piece:
            self.emit(piece)

    def end(self):
        """The bytes of a character the completion stopped inside of, as U+FFFD (they were
        dropped)."""
        piece = self.decoder.decode(b"", final=True)
        if piece:
            self.emit(piece)


def load_profiled(profile_path, checkpoint=None, device="auto") -> ProfiledModel:
    """The profile's model (or `checkpoint`, which must have the same content hash), loaded in
    the profile's dtype, ready to generate with its loops, mode and window."""
    from looptune.model.checkpoint import load_model

    profile = read_profile(profile_path)
    path = Path(checkpoint) if checkpoint else model_path(profile)
    check_model(profile, path, profile_path)
    knobs = profile.knobs
    model, tokenizer = load_model(path, device=device, dtype=knobs.dtype)
    return ProfiledModel(model, tokenizer, knobs, Path(profile_path))
