"""Tokenizers: bytes for random-weight models, a Hugging Face tokenizer.json for real checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from pdmesh.errors import InvalidArgument
from pdmesh.reasons import Reason


class ByteTokenizer:
    """Ids 0..255 are the UTF-8 bytes of the text; 256 is BOS, 257 is EOS.

    `encode` puts BOS first. `decode` drops the specials and replaces bytes that are not valid
    UTF-8 (a random model emits plenty) with U+FFFD, so any id list decodes.
    """

    BOS = 256
    EOS = 257

    @property
    def vocab_size(self) -> int:
        return 258

    @property
    def bos_id(self) -> int:
        return self.BOS

    @property
    def eos_id(self) -> int:
        return self.EOS

    @property
    def eos_ids(self) -> frozenset[int]:
        return frozenset({self.EOS})

    def encode(self, text: str) -> list[int]:
        return [self.BOS, *text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HfTokenizer:
    """A Hugging Face fast tokenizer (tokenizer.json, through the `tokenizers` package).

    BOS is added by the tokenizer's own post-processor (as Llama checkpoints ship it). The EOS ids
    are the union of config.json's and generation_config.json's `eos_token_id` (an int or a list).
    """

    def __init__(self, path: str | Path, bos_id: int | None, eos_ids: Sequence[int]) -> None:
        from tokenizers import Tokenizer  # imported here: random-weight engines never need it

        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # the tokenizers package raises a bare Exception on a bad file
            raise InvalidArgument(f"{path} cannot be read as a tokenizer ({exc}); replace it, or delete the "
                                  "folder if pdmesh cached it", reason=Reason.INVALID_MODEL_FOLDER,
                                  metadata={"path": path}) from None
        self._bos = bos_id
        if not eos_ids:
            raise InvalidArgument(f"no eos_token_id in the model folder of {path}; set one in "
                                  "config.json or generation_config.json", reason=Reason.INVALID_MODEL_FOLDER)
        self._eos = tuple(dict.fromkeys(eos_ids))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos[0]

    @property
    def eos_ids(self) -> frozenset[int]:
        return frozenset(self._eos)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=True).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)


def _ids(value: object) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]  # type: ignore[union-attr]


def load_hf_tokenizer(folder: str | Path) -> HfTokenizer:
    """The tokenizer of a local HF model folder (tokenizer.json plus the special ids of its configs)."""
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise InvalidArgument(f"{path} is missing; this engine reads fast tokenizers (tokenizer.json) "
                              "only", reason=Reason.INVALID_MODEL_FOLDER, metadata={"path": path})
    configs = [json.loads(p.read_text()) for p in (folder / "config.json", folder / "generation_config.json")
               if p.is_file()]
    bos = next((c["bos_token_id"] for c in configs if c.get("bos_token_id") is not None), None)
    eos = [i for c in configs for i in _ids(c.get("eos_token_id"))]
    return HfTokenizer(path, None if bos is None else int(bos), eos)
