"""GGUF export of a causal-LM model dir, for llama.cpp and Ollama, and the check that the file gives the same answers.

    export_model("runs/lm/student", fmt="gguf", out_dir="exports/student-gguf")                  # F32 weights
    export_model("runs/lm/student", fmt="gguf", out_dir="exports/student-gguf-f16", outtype="f16")

Exported dir:

    model.gguf      weights, hyperparameters, tokenizer (vocabulary, merges, special ids) and chat template
    kdistill.json   the model dir's kdistill.json and the export's record (file, outtype, tokenizer pre-tokenizer)
    parity.json     what the parity check measured

The file is what llama.cpp's convert_hf_to_gguf.py writes for the two decoder layouts kdistill's LM students use,
`llama` (SmolLM2: LlamaModel) and `qwen2` (Qwen2.5: Qwen2Model): the tensor names of gguf's TensorNameMap
(token_embd, blk.N.attn_q ... ffn_down, output_norm, output), Q and K rows permuted for `llama` (LlamaModel.permute:
llama.cpp's rotary pairs dimensions i and i + d/2 of a head as adjacent values), no `output` tensor when the LM head
is tied to the embedding, 1-D tensors, norms and biases in F32 whatever the outtype, and a byte-level BPE tokenizer
("gpt2") as get_vocab_base and gguf.SpecialVocab read it.

Parity: the file is reloaded by transformers (its GGUF loader reverses the permutation and rebuilds the tokenizer from
the metadata) and, where llama-cpp-python is installed, by llama.cpp; each must encode the texts (and a chat-template
sample) to the source tokenizer's ids and give next-token log-probs, at every position and over the whole vocabulary,
within PARITY_ATOL (llama.cpp: LLAMA_CPP_ATOL) of PyTorch running the weights the file stores. Otherwise the export
is refused and nothing is written.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from kdistill.errors import UserError
from kdistill.models import ModelDirInfo

GGUF_FILE = "model.gguf"

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
"""config.json model_type -> the class whose weights and config the export writes; gguf's architecture name is the
same as the model_type for both."""

OUTTYPES = ("f32", "f16")
DEFAULT_OUTTYPE = "f32"
"""F32 by default: the file then gives the source model's outputs exactly. F16 halves the file but moves the outputs:
on a 30-layer SmolLM2-135M student, max |Δ log p| 0.03 over the built-in texts and 0.29 over a chat-template sample
(argmax agreement 99.7%); on Qwen2.5-Coder-0.5B 0.012 (100%). That is far above a tolerance that still catches a
wrongly written file, so f16 is checked against the weights it stores and its rounding is only recorded."""

PARITY_ATOL = 1e-4
"""Largest max |Δ log p| (nats, any position, any token) accepted between PyTorch with the weights the file stores
(f16: rounded to float16) and the file reloaded by transformers, which runs the same code on the same numbers:
measured 0.0 on the tiny test models, on Qwen2.5-Coder-0.5B (f32, f16) and on the SmolLM2-135M student in f16;
1.7e-5 on that student in f32, which is float32 rounding alone (the model dir's weights, mapped from safetensors at
unaligned addresses, take another matmul kernel path: the model against its own deep copy differs by the same).
Q/K rows left unpermuted read back 29 nats off on that student (argmax agreement 44%)."""

LLAMA_CPP_ATOL = 0.5
"""The same bound for llama.cpp, which computes with its own kernels (on CPU an F16 weight meets activations rounded
to F16), so only a coarse one holds; it still separates a faithful file from a wrongly laid out one (29 nats above).
llama.cpp's own deviation is not measured by the tests: they skip that check where llama-cpp-python is absent."""


def check_gguf_source(info: ModelDirInfo, outtype: str) -> None:
    """UserError naming the dir unless it holds a causal LM of a layout the export writes faithfully: read from its
    config.json before any weight is loaded."""
    from transformers import AutoModelForCausalLM

    from kdistill.task import get_task, task_names

    if outtype not in OUTTYPES:
        raise UserError(f"unknown GGUF outtype {outtype!r}; choose {' or '.join(OUTTYPES)}")
    if get_task(info.task).auto_model is not AutoModelForCausalLM:
        lm_tasks = [n for n in task_names() if get_task(n).auto_model is AutoModelForCausalLM]
        raise UserError(f"{info.path}: GGUF export is for causal-LM model dirs ({', '.join(lm_tasks)}); this one is "
                        f"task {info.task!r}")
    config = info.config
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        supported = ", ".join(f"{arch} ({cls})" for arch, cls in ARCHITECTURES.items())
        raise UserError(f"{info.path}: GGUF export supports {supported}; this model is {model_type!r}")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    unsupported = {
        "rope scaling": rope.get("rope_type", rope.get("type", "default")) != "default",
        "sliding-window attention": bool(config.get("use_sliding_window")),
        "an activation other than silu": config.get("hidden_act", "silu") != "silu",
        # llama.cpp reads these two; transformers' GGUF loader does not, so its reload could not check the file
        "attention or MLP biases": model_type == "llama" and (config.get("attention_bias") or config.get("mlp_bias")),
        "a head_dim other than hidden_size / num_attention_heads": model_type == "qwen2" and config.get("head_dim")
        not in (None, config.get("hidden_size", 0) // config.get("num_attention_heads", 1)),
    }
    found = [what for what, present in unsupported.items() if present]
    if found:
        raise UserError(f"{info.path}: GGUF export does not support a {model_type} model with {found[0]}")


# --------------------------------------------------------------------------------------------- writing


def write_gguf(model, tokenizer, model_dir: Path, path: Path, *, outtype: str) -> dict[str, Any]:
    """`model` (a Llama or Qwen2 causal LM) and `tokenizer`, both loaded from `model_dir`, as the GGUF file `path`;
    returns what the export's metadata records of it. general.name is the model dir's name after its parent's
    (runs/demo/student: "demo-student")."""
    import gguf

    config = model.config
    arch = config.model_type
    pre = _pre_tokenizer(tokenizer)
    with _gguf_quiet():  # the writer logs the byte order, the file list and sizes at INFO
        writer = gguf.GGUFWriter(path, arch)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(f"{model_dir.resolve().parent.name}-{model_dir.resolve().name}")
        _add_hyperparameters(writer, config)
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if outtype == "f16" else gguf.LlamaFileType.ALL_F32)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_tokenizer(writer, tokenizer, model_dir, config.vocab_size, pre)
        n_tensors = 0
        for gguf_name, array in _tensors(model, outtype):
            writer.add_tensor(gguf_name, array)
            n_tensors += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return {"file": path.name, "outtype": outtype, "gguf_architecture": arch, "tokenizer_pre": pre,
            "n_tensors": n_tensors, "size_bytes": path.stat().st_size}


def _add_hyperparameters(writer, config) -> None:
    """TextModel.set_gguf_parameters and LlamaModel's additions. llama.cpp's converter writes the rope dimension
    count and vocab size for `llama` only; every architecture reads them, so both get them here."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if getattr(config, "head_dim", None) is not None:  # as the converter: only a head size the config states
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)


def _tensors(model, outtype: str):
    """(GGUF name, array) of every weight, in state-dict order: Q/K rows permuted for `llama`, the LM head left out
    when tied, F16 (outtype f16) for 2-D weights only, as convert_hf_to_gguf's prepare_tensors."""
    import gguf
    import torch

    config = model.config
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[config.model_type.upper()], config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        if config.tie_word_embeddings and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when there is no `output`
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UserError(f"{model.name_or_path}: tensor {hf_name} has no GGUF name for {config.model_type}")
        data = tensor.detach().to(torch.float32)
        if config.model_type == "llama" and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = _permute(data, n_head)
        elif config.model_type == "llama" and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = _permute(data, n_kv)
        array = data.numpy()
        keep_f32 = array.ndim <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight")
        yield gguf_name, array if outtype == "f32" or keep_f32 else array.astype(np.float16)


def _permute(weights, n_head: int):
    """LlamaModel.permute: HF stores each head's rotary halves [x_0..x_{d/2-1}, x_{d/2}..x_{d-1}]; llama.cpp's rope
    (GGML_ROPE_TYPE_NORM) rotates adjacent pairs, so each head's rows are interleaved as (x_0, x_{d/2}, x_1, ...)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _pre_tokenizer(tokenizer) -> str:
    """llama.cpp's name (tokenizer.ggml.pre) for the tokenizer's pre-tokenizer. llama.cpp's converter recognises a
    known vocabulary by hashing its tokens; a student's tokenizer is matched by its structure instead: byte-level BPE
    split by GPT-2's regex, or by Qwen2's regex followed by byte-level mapping (what transformers builds from
    Qwen2.5 GGUF teachers). UserError for any other: llama.cpp would split text differently."""
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_SPLIT

    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    pre = spec.get("pre_tokenizer") or {}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False}
    steps = pre.get("pretokenizers", [pre])
    if spec.get("model", {}).get("type") == "BPE" and steps and byte_level.items() <= steps[-1].items():
        if len(steps) == 1 and steps[0].get("use_regex", True):
            return "gpt-2"  # llama.cpp's name for GPT-2's own regex
        split = steps[0]
        if (len(steps) == 2 and not steps[1].get("use_regex", True) and split.get("type") == "Split"
                and split.get("pattern") == {"Regex": QWEN2_SPLIT} and split.get("behavior") == "Isolated"
                and not split.get("invert")):
            return "qwen2"
    raise UserError(f"{tokenizer.name_or_path}: GGUF export writes byte-level BPE tokenizers split by GPT-2's or "
                    f"Qwen2's regex; this tokenizer's pre-tokenizer is {json.dumps(pre)[:120]}")


def _add_tokenizer(writer, tokenizer, model_dir: Path, vocab_size: int, pre: str) -> None:
    """TextModel._set_vocab_gpt2: the vocabulary with llama.cpp's token types, gguf.SpecialVocab's merges and
    special token ids (read from the model dir's tokenizer.json, tokenizer_config.json and config.json, as the
    converter reads them). Whether BOS / EOS are added is taken from what the tokenizer does, and the chat template
    from the tokenizer itself."""
    import gguf

    tokens, types = _vocab(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    special.add_special_token = _adds_special_tokens(tokenizer)
    special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)


def _vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """get_vocab_base: a token per id up to the model's vocab_size ([PAD<id>], UNUSED, where the tokenizer has
    none); added tokens CONTROL when special (or looking special, as `<|...|>`), else USER_DEFINED."""
    import gguf

    reverse = {i: token for token, i in tokenizer.get_vocab().items()}
    if max(reverse) >= vocab_size:
        raise UserError(f"{tokenizer.name_or_path}: the tokenizer has ids up to {max(reverse)}, past the model's "
                        f"vocab_size {vocab_size}")
    added, decoder = tokenizer.get_added_vocab(), tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        if token in added:
            if not decoder[i].normalized:  # llama.cpp matches added tokens in the text as they are written
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            looks_special = token.startswith(("<|", "<｜")) and token.endswith(("|>", "｜>"))
            types.append(gguf.TokenType.CONTROL if decoder[i].special or looks_special
                         else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def _adds_special_tokens(tokenizer) -> dict[str, bool]:
    """Whether encoding a text adds BOS in front and EOS at the end (tokenizer.ggml.add_bos_token / add_eos_token):
    written always, since llama.cpp's default for a missing flag differs by pre-tokenizer."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    ids = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return {"bos": bos is not None and ids[0] == bos and plain[0] != bos,
            "eos": eos is not None and ids[-1] == eos and plain[-1] != eos}


@contextmanager
def _gguf_quiet():
    logger = logging.getLogger("gguf")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


# --------------------------------------------------------------------------------------------- parity


def gguf_parity(model, tokenizer, out: Path, texts: list[str], max_length: int, *, outtype: str, atol: float
                ) -> dict[str, Any]:
    """Reload out/GGUF_FILE with transformers (and llama.cpp, where installed) and compare each with `model` as the
    file stores it (outtype f16: every 2-D weight rounded to float16) and with `tokenizer`: the ids of every text, and
    the next-token log-probs at every position over the whole vocabulary. UserError when ids differ or log-probs
    differ by more than `atol` (llama.cpp: LLAMA_CPP_ATOL); the caller's atomic dir is then removed. For f16 the
    rounding's own effect (stored vs source weights) is recorded too, as "f16_rounding"."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    chat = _chat_sample(tokenizer, texts)
    texts = texts + chat
    path = out / GGUF_FILE
    ids = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
    reloaded_tokenizer = AutoTokenizer.from_pretrained(str(out), gguf_file=path.name)
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=path.name, dtype=torch.float32).eval()
    readers = {"gguf": lambda row: _log_probs(reloaded, row)}
    backends = {"pytorch": {"weights": "fp32" if outtype == "f32" else "2-D weights rounded to float16, as stored"},
                "gguf": {"file": path.name, "reader": "transformers", "size_bytes": path.stat().st_size,
                         "texts_with_other_ids": _other_ids(ids, [reloaded_tokenizer(t, truncation=True,
                                                                                     max_length=max_length)["input_ids"]
                                                                  for t in texts])}}
    llm, backends["llama.cpp"] = _llama_cpp(path, texts, ids, max_length)
    if llm is not None:
        readers["llama.cpp"] = lambda row: _llama_cpp_log_probs(llm, row)
    agreement = {name: _Agreement() for name in readers}
    rounding, stored_model = (_Agreement(), _rounded_to_f16(model)) if outtype == "f16" else (None, model)
    for row in ids:  # one text at a time: a (length, vocab) array of log-probs is large for a 150k vocabulary
        source = _log_probs(model, row)
        stored = source if rounding is None else _log_probs(stored_model, row)
        if rounding is not None:
            rounding.add(source, stored)
        for name, read in readers.items():
            agreement[name].add(stored, read(row))
    for name, entry in backends.items():
        entry.update(agreement[name].summary() if name in agreement else {})
        if entry.get("texts_with_other_ids"):
            raise UserError(f"GGUF parity check failed: {name}'s tokenizer encodes {entry['texts_with_other_ids']} of "
                            f"{len(texts)} texts to other ids than the model dir's tokenizer; nothing was written")
        limit = LLAMA_CPP_ATOL if name == "llama.cpp" else atol
        if entry.get("max_abs_logprob_diff", 0.0) > limit:
            raise UserError(f"GGUF parity check failed: {name}'s next-token log-probs differ from PyTorch by up to "
                            f"{entry['max_abs_logprob_diff']:.3g} (> atol {limit:g}); nothing was written")
    parity = {"reference": "pytorch", "backends": backends, "chat_template_sample": bool(chat)}
    if rounding is not None:
        parity["f16_rounding"] = rounding.summary()
    return parity


class _Agreement:
    """Running max |Δ log p| and argmax agreement of a candidate's log-probs with the reference's, text by text."""

    def __init__(self):
        self.worst, self.agree, self.positions = 0.0, 0, 0

    def add(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        self.worst = max(self.worst, float(np.abs(reference - candidate).max()))
        self.agree += int((reference.argmax(-1) == candidate.argmax(-1)).sum())
        self.positions += len(reference)

    def summary(self) -> dict[str, float]:
        return {"max_abs_logprob_diff": self.worst, "argmax_agreement": self.agree / max(self.positions, 1)}


def _other_ids(ids: list[list[int]], other: list[list[int]]) -> int:
    return sum(a != b for a, b in zip(ids, other))


def _rounded_to_f16(model):
    """A copy of `model` holding what an f16 file stores: 2-D weights through float16, norms and biases as they are."""
    import copy

    import torch

    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            if p.ndim >= 2:
                p.copy_(p.half().float())
    return rounded


def _chat_sample(tokenizer, texts: list[str]) -> list[str]:
    """The first two texts as a user turn and an assistant reply in the tokenizer's chat template (none without
    one): its special tokens are what a GGUF tokenizer most often gets wrong."""
    if tokenizer.chat_template is None or len(texts) < 2:
        return []
    messages = [{"role": "user", "content": texts[0]}, {"role": "assistant", "content": texts[1]}]
    return [tokenizer.apply_chat_template(messages, tokenize=False)]


def _log_probs(model, ids: list[int]) -> np.ndarray:
    """(len(ids), vocab) next-token log-probs of `model` after each prefix of `ids`."""
    import torch

    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1).numpy()


def _llama_cpp(path: Path, texts: list[str], ids: list[list[int]], max_length: int):
    """(llama_cpp.Llama over the file, its record: how many texts its tokenizer encodes to other ids), or (None,
    why the comparison was skipped)."""
    try:
        import llama_cpp
    except ImportError:
        return None, {"skipped": "llama-cpp-python is not installed (pip install llama-cpp-python runs this check too)"}
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(len(row) for row in ids), logits_all=True, verbose=False)
    # add_bos=True: add BOS where the file's tokenizer.ggml.add_bos_token says so, as a llama.cpp runtime does
    llama_ids = [llm.tokenize(t.encode("utf-8"), add_bos=True, special=True)[:max_length] for t in texts]
    return llm, {"file": path.name, "reader": f"llama-cpp-python {llama_cpp.__version__}",
                 "texts_with_other_ids": _other_ids(ids, llama_ids)}


def _llama_cpp_log_probs(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    logits = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
    top = logits.max(-1, keepdims=True)
    return (logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))).astype(np.float32)


def gguf_version() -> str:
    return importlib.metadata.version("gguf")
