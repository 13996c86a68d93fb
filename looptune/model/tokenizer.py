"""Tokenizers: the built-in byte-level one, or a `tokenizer.json` read with `tokenizers`."""

from __future__ import annotations

from pathlib import Path

from looptune.errors import CheckpointError


class ByteTokenizer:
    """Ids 0..255 are bytes; 256 <bos>, 257 <eos>, 258 <pad>. Bits per byte come for free."""

    bos_id, eos_id, pad_id = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        return bytes([token_id]) if token_id < 256 else b""


class HFTokenizer:
    """A `tokenizer.json` (BPE and the like) through the `tokenizers` library."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 (tokenizers raises plain Exception on bad JSON)
            raise CheckpointError(f"{path}: not a readable tokenizer.json ({e})") from None
        self.vocab_size = self._tok.get_vocab_size()
        self.eos_id = next(
            (
                self._tok.token_to_id(t)
                for t in ("<|endoftext|>", "</s>", "<eos>")
                if self._tok.token_to_id(t) is not None
            ),
            None,
        )
        self.bos_id = self.pad_id = None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids))

    def token_bytes(self, token_id: int) -> bytes:
        return self._tok.decode([token_id]).encode("utf-8")


def load_tokenizer(directory: Path, kind: str):
    """The tokenizer a checkpoint names: "bytes", "tokenizer.json", or "none" (ids only)."""
    if kind == "bytes":
        return ByteTokenizer()
    path = Path(directory) / "tokenizer.json"
    return HFTokenizer(path) if path.exists() else None  # no tokenizer: the model takes ids only
