"""Vocabulary trimming: a trained encoder student keeps only the WordPiece tokens its task's text uses.

A BERT-family student cut from its teacher keeps the teacher's whole word-embedding table (MiniLM-L6: 30,522 x 384,
11.7M parameters, more than its two layers), although the text of one task reads a fraction of it. `trim_vocabulary`
keeps the rows of the tokens the student's own texts tokenize to, plus every special token and every single
character (bare and with the continuation prefix `##`), and gives a tokenizer over exactly those tokens, in the
same order; every other row goes.

Why text the student learned from reads exactly as before. WordPiece splits each word (after the normaliser and
the pre-tokeniser, which trimming leaves as they are) greedily from the left: at each position it takes the longest
piece the vocabulary V holds, and a word where no piece matches becomes [UNK] whole. Take a word whose pieces
p1..pk under V were all kept, in V' ⊆ V. At each step the piece chosen under V, p_t, is still in V'; a longer
candidate is not in V (else it would have been chosen) so not in V'; hence the step chooses p_t again. The same
holds where the word became [UNK]: the steps before the failure choose the same pieces, and a position where V
matched nothing matches nothing in V' either. So a text whose tokens were all kept tokenizes into the same pieces,
at the same positions, under the new ids, and the trimmed model computes what the untrimmed one did. A word of
unseen text may need a dropped piece: the greedy match then takes a shorter kept one, at worst single characters,
so the word still reads, in more and smaller pieces than before (the cost of trimming); a character the vocabulary
never held is [UNK] as it was.
"""

from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn
from tokenizers import Tokenizer

from kdistill.student.build import count_parameters

SPECIAL_ID_ATTRIBUTES = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id",
                         "mask_token_id", "unk_token_id", "decoder_start_token_id")
"""Token ids a model config may name: each one is kept, and renumbered in the trimmed model's config."""


def _wordpiece(tokenizer) -> tuple[dict, str]:
    """(tokenizer.json as a dict, the continuation prefix); ValueError unless a fast WordPiece tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not getattr(tokenizer, "is_fast", False) or backend is None:
        raise ValueError(f"vocabulary trimming needs a fast WordPiece tokenizer, not {type(tokenizer).__name__}")
    spec = json.loads(backend.to_str())
    if spec["model"].get("type") != "WordPiece":
        raise ValueError(f"vocabulary trimming needs a WordPiece tokenizer; this one is {spec['model'].get('type')}")
    return spec, spec["model"].get("continuing_subword_prefix", "##")


def check_trimmable(tokenizer) -> None:
    """ValueError naming why, unless `trim_vocabulary` can trim over `tokenizer` (a fast WordPiece)."""
    _wordpiece(tokenizer)


def used_token_ids(tokenizer, texts: Iterable[str | Sequence[str] | None]) -> set[int]:
    """The ids `tokenizer` gives the words of `texts`, whole (no truncation), special tokens aside. An item is a
    text, or a list of words (token classification's pre-split sentences); None is skipped."""
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())  # a copy: its padding and truncation off
    backend.no_truncation()
    backend.no_padding()
    plain, split = [], []
    for item in texts:
        if isinstance(item, str):
            plain.append(item)
        elif item is not None:
            split.append([str(word) for word in item])
    ids: set[int] = set()
    for batch, pretokenized in ((plain, False), (split, True)):
        for start in range(0, len(batch), 1024):
            for encoding in backend.encode_batch(batch[start:start + 1024], is_pretokenized=pretokenized,
                                                 add_special_tokens=False):
                ids.update(encoding.ids)
    return ids


def kept_token_ids(tokenizer, texts, config=None) -> list[int]:
    """The ids a trimmed vocabulary keeps, ascending: those `texts` use, the special and added tokens, the ids
    `config` names (pad_token_id and the like), and every token of one character, bare or after the prefix."""
    spec, prefix = _wordpiece(tokenizer)
    vocab = tokenizer.get_vocab()
    keep = used_token_ids(tokenizer, texts)
    keep |= set(tokenizer.all_special_ids) | {t["id"] for t in spec.get("added_tokens") or []}
    keep |= {i for token, i in vocab.items()
             if len(token) == 1 or (token.startswith(prefix) and len(token) == len(prefix) + 1)}
    for name in SPECIAL_ID_ATTRIBUTES:
        value = getattr(config, name, None) if config is not None else None
        if isinstance(value, int) and 0 <= value < len(vocab):
            keep.add(value)
    return sorted(keep)


def _renumber_post_processor(node: dict | None, new_id: dict[str, int]) -> None:
    """The special tokens' ids in a post-processor (BertProcessing, RobertaProcessing, TemplateProcessing, a
    Sequence of them), in place: their new ids by token."""
    if not node:
        return
    for key in ("cls", "sep"):  # BertProcessing / RobertaProcessing: [token, id]
        if isinstance(node.get(key), list):
            node[key] = [node[key][0], new_id[node[key][0]]]
    for special in (node.get("special_tokens") or {}).values():  # TemplateProcessing
        special["ids"] = [new_id[token] for token in special["tokens"]]
    for child in node.get("processors") or []:  # Sequence
        _renumber_post_processor(child, new_id)


def trim_tokenizer(tokenizer, keep: list[int]):
    """A tokenizer of `tokenizer`'s class over the tokens of ids `keep` only, numbered 0.. in the order of `keep`:
    the same normaliser, pre-tokeniser, decoder, special tokens (post-processor and added tokens with their new
    ids), model_max_length and padding side. Written as `tokenizer` saves itself, with the vocabulary rewritten
    in tokenizer.json (and vocab.txt, tokenizer_config.json's added_tokens_decoder where they are), and read back."""
    _wordpiece(tokenizer)
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    new_id = {by_id[old]: new for new, old in enumerate(keep)}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        root = Path(tmp)
        spec = json.loads((root / "tokenizer.json").read_text(encoding="utf-8"))
        spec["model"]["vocab"] = {token: i for token, i in new_id.items() if token in spec["model"]["vocab"]}
        spec["added_tokens"] = [{**t, "id": new_id[t["content"]]} for t in spec.get("added_tokens") or []]
        _renumber_post_processor(spec.get("post_processor"), new_id)
        if spec.get("padding"):
            spec["padding"]["pad_id"] = new_id[spec["padding"]["pad_token"]]
        (root / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
        if (root / "vocab.txt").is_file():
            (root / "vocab.txt").write_text("".join(f"{token}\n" for token in new_id), encoding="utf-8")
        config_file = root / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        if config.get("added_tokens_decoder"):
            config["added_tokens_decoder"] = {str(new_id[t["content"]]): t
                                              for t in config["added_tokens_decoder"].values()}
            config_file.write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
        trimmed = type(tokenizer).from_pretrained(tmp)
        trimmed.name_or_path = tokenizer.name_or_path
    if trimmed.get_vocab() != new_id:
        raise ValueError("the trimmed tokenizer does not read back the vocabulary it was written with")
    return trimmed


def trim_embeddings(model: nn.Module, keep: list[int]) -> None:
    """Slice `model`'s input embedding rows to `keep`, in that order, in place; an output layer over the
    vocabulary (a language-model head) is sliced the same way, and stays tied to the input embeddings if it was.
    config.vocab_size and the token ids the config names follow."""
    old = model.get_input_embeddings()
    if max(keep) >= old.num_embeddings:
        raise ValueError(f"token id {max(keep)} has no row in the {old.num_embeddings}-row embedding table")
    index = torch.tensor(keep, dtype=torch.long, device=old.weight.device)
    new_of = {old_id: new for new, old_id in enumerate(keep)}
    pad = new_of.get(old.padding_idx) if old.padding_idx is not None else None
    new = nn.Embedding(len(keep), old.embedding_dim, padding_idx=pad, device=old.weight.device,
                       dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(old.weight.index_select(0, index))
    new.weight.requires_grad_(old.weight.requires_grad)
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is old.weight
    model.set_input_embeddings(new)
    if output is not None and output.weight.shape[0] == old.num_embeddings:
        head = nn.Linear(output.in_features, len(keep), bias=output.bias is not None, device=old.weight.device,
                         dtype=output.weight.dtype)
        with torch.no_grad():
            head.weight = new.weight if tied else nn.Parameter(output.weight.index_select(0, index).clone())
            if output.bias is not None:
                head.bias.copy_(output.bias.index_select(0, index))
        model.set_output_embeddings(head)
    config = model.config
    config.vocab_size = len(keep)
    for name in SPECIAL_ID_ATTRIBUTES:
        value = getattr(config, name, None)
        if isinstance(value, int):
            setattr(config, name, new_of.get(value))


def trim_vocabulary(model: nn.Module, tokenizer, texts: Iterable[str | Sequence[str] | None]):
    """(trimmed model, trimmed tokenizer, info): copies of `model` and `tokenizer` over the tokens `texts` use
    (`kept_token_ids`), the inputs left as they are. `texts`: what the student learned from (training and transfer
    texts; never held-out ones, whose words would then be kept for the test); an item is a text or a list of
    words. info: {"teacher": rows before, "student": rows after, "params_before", "params_after"}.

    Text made of kept tokens gives the same pieces, hence the same outputs (the module docstring argues why);
    ValueError unless the tokenizer is a fast WordPiece."""
    keep = kept_token_ids(tokenizer, texts, model.config)
    rows = model.get_input_embeddings().num_embeddings
    trimmed = copy.deepcopy(model)
    trim_embeddings(trimmed, keep)
    info = {"teacher": rows, "student": len(keep), "params_before": count_parameters(model),
            "params_after": count_parameters(trimmed)}
    return trimmed, trim_tokenizer(tokenizer, keep), info
