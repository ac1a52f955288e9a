"""Pairing two tokenizations of the same text, for logit distillation between causal LMs over different vocabularies.

Two building blocks, pure python/torch (no model), that `losses.uld_loss` and `losses.aligned_kd_loss` read:

* `aligned_positions`: the positions where both models have read exactly the same text, found from the fast
  tokenizers' character offsets (``return_offsets_mapping=True``);
* `shared_vocab`: the tokens both vocabularies hold, matched as byte strings after undoing each tokenizer's
  encoding of spaces and bytes (byte-level BPE's 'Ġ'/'Ċ', SentencePiece's '▁' and <0xNN> byte-fallback pieces).

Positions. In a causal LM the logits at position i are the distribution of the token after token i, given
everything up to the END of token i. When a teacher token and a student token end at the same character e, both
models have read text[:e] and both predict how the text continues from e; their next tokens may differ (" unbel"
vs " un"), but they are two tokenizers' views of the same continuation. Those end-offset matches are the points
where the two segmentations agree on a boundary: the chunk boundaries of ALM (Minixhofer et al. 2025, "Universal
Cross-Tokenizer Distillation via Approximate Likelihood Matching") and the byte-offset group boundaries of GOLD
(Hugging Face TRL's GOLDTrainer, 2025). Where we differ: ALM compares the likelihoods of the chunks between
boundaries and GOLD merges the probabilities of the tokens inside a group; we keep only the boundary positions
themselves and compare the two full next-token distributions there (ULD, or the shared-vocabulary KL), so
positions inside a disagreeing span give no signal. Unlike MinED (FuseLLM, Wan et al. 2024: a minimum-edit-
distance alignment of the token strings) nothing is approximate: a pair is exact or absent. Unlike DSKD (Zhang et
al. 2024, cross-model attention) nothing is learned.

Vocabularies. GOLD matches tokens whose vocabulary strings are equal; we first decode each token to the bytes it
stands for, so 'Ġthe' (GPT-2 byte-level) and '▁the' (SentencePiece) are the same token " the", and 'Ċ' and
'<0x0A>' are both a newline.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["aligned_positions", "aligned_positions_batch", "byte_ends", "pairs_of_ends", "shared_vocab", "token_bytes",
           "tokenizer_scheme"]

Offsets = Sequence[Sequence[int]] | Tensor  # (L, 2) character spans [start, end)


# --------------------------------------------------------------------------------------------------- positions


def _boundaries(offsets: Offsets, text_length: int) -> dict[int, int]:
    """{end offset: position} of the tokens after which the text up to that offset has been read completely.

    Skipped: tokens with offsets (0, 0), i.e. special tokens and padding of a fast tokenizer; a token whose
    successor starts before it ends, i.e. one byte token of a character split over several (byte-level BPE gives
    every part the whole character's span) or SentencePiece's prefix '▁' before the first word (both span
    (0, 1)); and the last token unless it ends the text, since in a truncated tokenization nothing shows whether
    it ends inside a character. Of several tokens ending at the same offset the last one counts: it has read
    the most.
    """
    spans = [(int(s), int(e)) for s, e in (offsets.tolist() if isinstance(offsets, Tensor) else offsets)]
    tokens = [(i, s, e) for i, (s, e) in enumerate(spans) if (s, e) != (0, 0)]  # text tokens only
    ends: dict[int, int] = {}
    for k, (i, _start, end) in enumerate(tokens):
        if end > text_length:
            raise ValueError(f"token {i} ends at {end}, past the text's {text_length} characters: offsets of "
                             f"another text?")
        complete = tokens[k + 1][1] >= end if k + 1 < len(tokens) else end == text_length
        if complete:
            ends[end] = i
    return ends


def aligned_positions(text: str, teacher_offsets: Offsets, student_offsets: Offsets) -> tuple[Tensor, Tensor]:
    """Pairs (teacher position, student position) of tokens that end at the same character of `text`.

    At such a pair both causal LMs have read text[:e] and predict its continuation, so their next-token
    distributions (the logits at those positions) can be compared. Example: "unbelievable" as
    ["un", "believ", "able"] and ["unbel", "ievable"] pairs only the last tokens (2, 1).

    text: the string both tokenizers encoded.   teacher_offsets: (Lt, 2), student_offsets: (Ls, 2): character
    spans [start, end) of each token, as a fast tokenizer returns them with return_offsets_mapping=True (a list of
    pairs or a tensor). Special tokens and padding ((0, 0)) are never paired, so the prediction of the first text
    token from a BOS is not paired either; see `_boundaries` for the other tokens skipped.
    Returns two (P,) int64 tensors, in text order.
    """
    teacher = _boundaries(teacher_offsets, len(text))
    student = _boundaries(student_offsets, len(text))
    common = sorted(teacher.keys() & student.keys())
    return (torch.tensor([teacher[e] for e in common], dtype=torch.long),
            torch.tensor([student[e] for e in common], dtype=torch.long))


def aligned_positions_batch(texts: Sequence[str], teacher_offsets: Sequence[Offsets],
                            student_offsets: Sequence[Offsets]) -> tuple[Tensor, Tensor, Tensor]:
    """`aligned_positions` for a batch: row b of both offset batches (B, Lt, 2) and (B, Ls, 2) encodes texts[b].

    Padding rows ((0, 0)) are skipped, on either side. Returns (row, teacher position, student position), three
    (P,) int64 tensors, so that teacher_logits[row, t_pos] and student_logits[row, s_pos] are the paired (P, V)
    rows for `losses.uld_loss` / `losses.aligned_kd_loss`.
    """
    if not len(texts) == len(teacher_offsets) == len(student_offsets):
        raise ValueError(f"aligned_positions_batch: {len(texts)} texts, {len(teacher_offsets)} teacher and "
                         f"{len(student_offsets)} student offset rows")
    rows, t_pos, s_pos = [], [], []
    for b, (text, t_off, s_off) in enumerate(zip(texts, teacher_offsets, student_offsets)):
        t, s = aligned_positions(text, t_off, s_off)
        rows.append(torch.full_like(t, b))
        t_pos.append(t)
        s_pos.append(s)
    empty = torch.zeros(0, dtype=torch.long)
    return tuple(torch.cat(parts) if parts else empty for parts in (rows, t_pos, s_pos))


def byte_ends(text: str, offsets: Offsets) -> list[int]:
    """Per token of one tokenization of `text`: the UTF-8 byte offset where it ends when it is a boundary after
    which `text` has been read completely (`_boundaries`), else -1.

    The form stored in a cross-tokenizer teacher signal (kdistill/cache/): bytes, not characters, so that any
    reader, in any language, finds the same boundaries; `pairs_of_ends` pairs two such rows. offsets: (L, 2)
    character spans as `aligned_positions` takes them. Returns L ints.
    """
    prefix = [0]  # prefix[c]: the byte offset of character c
    for ch in text:
        prefix.append(prefix[-1] + len(ch.encode("utf-8")))
    ends = [-1] * len(offsets)
    for end, position in _boundaries(offsets, len(text)).items():
        ends[position] = prefix[end]
    return ends


def pairs_of_ends(teacher_ends: Tensor, student_ends: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(row, teacher position, student position), three (P,) int64 tensors: the tokens of row b of the two
    batches that end at the same byte of that row's text, i.e. `aligned_positions_batch` on stored `byte_ends`.

    teacher_ends: (B, Lt), student_ends: (B, Ls) integer, -1 = not a boundary (padding, special tokens, a token
    inside a character). Within a row the boundaries of one tokenization increase strictly, so each one matches at
    most one of the other side. Pairs come in (row, text) order.
    """
    if teacher_ends.shape[0] != student_ends.shape[0]:
        raise ValueError(f"pairs_of_ends: {teacher_ends.shape[0]} teacher rows, {student_ends.shape[0]} student rows")
    t_row, t_pos = (teacher_ends >= 0).nonzero(as_tuple=True)
    s_row, s_pos = (student_ends >= 0).nonzero(as_tuple=True)
    stride = int(max(teacher_ends.max(), student_ends.max(), 0)) + 1 if teacher_ends.numel() and \
        student_ends.numel() else 1
    t_key = t_row * stride + teacher_ends[t_row, t_pos].long()  # increasing: row-major, ends increase in a row
    s_key = s_row * stride + student_ends[s_row, s_pos].long()
    at = torch.searchsorted(t_key, s_key).clamp_max(max(len(t_key) - 1, 0))
    hit = t_key[at] == s_key if len(t_key) else torch.zeros_like(s_key, dtype=torch.bool)
    return s_row[hit], t_pos[at[hit]], s_pos[hit]


# ------------------------------------------------------------------------------------------------- vocabulary


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet (Radford et al. 2019, encoder.py): printable bytes stand for themselves, the
    others (space, control bytes, ...) for the characters from U+0100 up, in byte order: ' ' is 'Ġ', '\\n' is 'Ċ'."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


_BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}
_SENTENCEPIECE_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _components(node) -> list[dict]:
    """Every component dict of a serialised tokenizer part, Sequence members included."""
    if isinstance(node, dict):
        return [node, *(c for v in node.values() for c in _components(v))]
    if isinstance(node, list):
        return [c for v in node for c in _components(v)]
    return []


def tokenizer_scheme(tokenizer) -> str:
    """How the vocabulary writes text: "byte-level" (GPT-2 style), "sentencepiece" ('▁' for a space, <0xNN> byte
    pieces) or "plain" (strings as they are, e.g. WordPiece), read from the tokenizer's pre-tokenizer and decoder.

    tokenizer: a `tokenizers.Tokenizer` or a Hugging Face fast tokenizer (its `backend_tokenizer`).
    """
    spec = json.loads(getattr(tokenizer, "backend_tokenizer", tokenizer).to_str())
    parts = _components(spec.get("pre_tokenizer")) + _components(spec.get("decoder"))
    types = {p.get("type") for p in parts}
    if "ByteLevel" in types:
        return "byte-level"
    replaces_marker = any(p.get("type") == "Replace" and "▁" in json.dumps(p.get("pattern"), ensure_ascii=False)
                          for p in parts)
    if "Metaspace" in types or "ByteFallback" in types or replaces_marker:
        return "sentencepiece"
    return "plain"


def token_bytes(token: str, scheme: str) -> bytes | None:
    """The bytes of text a vocabulary entry stands for under `scheme` (see `tokenizer_scheme`); None when the
    string is not a valid entry of that scheme (a byte-level token with a character outside its alphabet)."""
    if scheme == "byte-level":
        if any(c not in _BYTE_DECODER for c in token):
            return None
        return bytes(_BYTE_DECODER[c] for c in token)
    if scheme == "sentencepiece":
        byte = _SENTENCEPIECE_BYTE.fullmatch(token)
        return bytes([int(byte.group(1), 16)]) if byte else token.replace("▁", " ").encode("utf-8")
    if scheme == "plain":
        return token.encode("utf-8")
    raise ValueError(f"unknown tokenizer scheme {scheme!r}; use 'byte-level', 'sentencepiece' or 'plain'")


def token_byte_lengths(tokenizer) -> Tensor:
    """(V,) int64, V = the highest id + 1: how many bytes of text each id stands for (`token_bytes`); 0 for
    special tokens and ids the scheme cannot read.

    The denominator of bits per byte, NLL / (ln 2 × bytes of the predicted tokens): unlike per-token perplexity it
    compares models whose tokenizers cut the same text into different numbers of tokens. A SentencePiece word's
    '▁' counts as the space it stands for, including the one its normaliser adds before a text's first word.
    `tokenizer`: a `tokenizers.Tokenizer` or a Hugging Face fast tokenizer of a causal LM (byte-level or
    SentencePiece; WordPiece's '##' continuation marker is not read).
    """
    entries = _entry_bytes(tokenizer)
    lengths = torch.zeros(max(i for _, i, _ in entries) + 1, dtype=torch.long)
    for _, i, data in entries:
        lengths[i] = len(data or b"")
    return lengths


def _entry_bytes(tokenizer) -> list[tuple[str, int, bytes | None]]:
    """(token, id, the bytes it stands for) of every vocabulary entry: None for special tokens (what they mean
    differs between models) and for strings the scheme cannot read; added tokens that are not special stand for
    their literal string, as they are matched on the raw text."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    scheme = tokenizer_scheme(backend)
    added = backend.get_added_tokens_decoder()  # {id: AddedToken}
    return [(token, i, (None if added[i].special else token.encode("utf-8")) if i in added
             else token_bytes(token, scheme))
            for token, i in backend.get_vocab(with_added_tokens=True).items()]


def _vocab_bytes(tokenizer) -> dict[bytes, int]:
    """{bytes: id} of a tokenizer's vocabulary, special tokens left out (what they mean differs between models).

    Added tokens that are not special are matched on the raw text, so they stand for their literal string. When
    two ids stand for the same bytes (SentencePiece's "A" and its byte-fallback piece <0x41>), the regular piece
    wins, as it is the one the tokenizer emits for that text; otherwise the lower id.
    """
    scheme = tokenizer_scheme(getattr(tokenizer, "backend_tokenizer", tokenizer))
    entries = [(scheme == "sentencepiece" and bool(_SENTENCEPIECE_BYTE.fullmatch(token)), i, data)
               for token, i, data in _entry_bytes(tokenizer) if data]
    table: dict[bytes, int] = {}
    for _, i, data in sorted(entries):
        table.setdefault(data, i)
    return table


def shared_vocab(teacher_tokenizer, student_tokenizer) -> tuple[Tensor, Tensor]:
    """The tokens both vocabularies hold: (teacher_ids (M,), student_ids (M,)) int64, one to one, in teacher-id
    order, for `losses.aligned_kd_loss`.

    Two entries match when they stand for the same bytes of text (`token_bytes`): 'Ġthe' = '▁the' = b" the",
    'Ċ' = '<0x0A>' = b"\\n". Special tokens are left out. Tokenizers: `tokenizers.Tokenizer` or Hugging Face fast
    tokenizers. A "plain" vocabulary (e.g. WordPiece, whose "##" pieces and implicit spaces have no byte form)
    matches on its raw strings, so it shares tokens only with a vocabulary written the same way.
    Caveat: SentencePiece's '▁the' at the very start of a text stands for "the" (its dummy prefix), 'Ġthe' never
    does; the first text token is never an aligned position (`aligned_positions`), so this does not arise there.
    """
    teacher = _vocab_bytes(teacher_tokenizer)
    student = _vocab_bytes(student_tokenizer)
    pairs = sorted((i, student[data]) for data, i in teacher.items() if data in student)
    ids = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)
    return ids[:, 0].contiguous(), ids[:, 1].contiguous()
