from kdistill.tokenization import tokenizer_from_vocab, train_wordpiece


def test_trained_wordpiece_keeps_chinese_characters_known():
    texts = ["这本书很好看", "质量不错，物流很快", "太失望了，不推荐"] * 5
    tok = train_wordpiece(texts, vocab_size=200)
    ids = tok("这本书质量很好")["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert tok.unk_token_id not in ids  # every character was seen in training
    assert len(ids) == 2 + 7  # one token per CJK character


def test_tokenizer_from_vocab_file(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "好", "书", "hello", "##s"]
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(vocab), encoding="utf-8")
    tok = tokenizer_from_vocab(path)
    assert tok("好书 hellos")["input_ids"] == [2, 5, 6, 7, 8, 3]
    assert tok("坏")["input_ids"] == [2, 1, 3]
