"""Which 10 of SmolLM2-135M's 30 blocks to keep, before any healing: held-out perplexity of the cut model for the
lm recipe's hand-picked cut, the uniform choice and Block Influence (ShortGPT), on the lm recipe's test blocks.

    python benchmarks/depth_pruning.py [--layers 10] > depth_pruning.json

Prints one JSON object: the Block Influence of every teacher block and each choice's perplexity (the hand-picked
cut only for 10 layers). Minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from kdistill.config import load_config
from kdistill.data import load_lm_corpus, pack_blocks
from kdistill.student import block_influence, build_student, most_influential, select_layers
from kdistill.teacher import load_causal_teacher
from kdistill.training import perplexity

HAND_PICKED = [0, 1, 2, 3, 4, 5, 6, 27, 28, 29]
"""The lm recipe's cut before importance ranking existed: the bottom 7 and top 3 blocks."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=10)
    args = parser.parse_args()
    cfg = load_config("lm", [])
    corpus = load_lm_corpus(cfg.data)
    teacher, tokenizer, _, _ = load_causal_teacher(cfg)
    blocks = {s: pack_blocks(corpus.docs[s], tokenizer, cfg.data.block_size) for s in ("train", "test")}
    started = time.perf_counter()
    scores = block_influence(teacher, blocks["train"].batch(slice(0, 8)))  # the calibration the run uses
    n = len(scores)
    choices = {"hand-picked (lm recipe)": HAND_PICKED} if args.layers == len(HAND_PICKED) else {}
    choices.update({"uniform": select_layers(n, args.layers, "uniform"),
                    "importance (Block Influence)": most_influential(scores, args.layers)})
    results = {"teacher": perplexity(teacher, blocks["test"])["perplexity"]}
    for name, layers in choices.items():
        student = build_student(teacher, layers=layers, init="teacher-layers")
        results[name] = {"layers": layers, "perplexity": perplexity(student, blocks["test"])["perplexity"]}
        print(f"{name}: layers {layers}: perplexity {results[name]['perplexity']:.1f}", file=sys.stderr)
    print(json.dumps({"block_influence": scores, "layers_kept": args.layers, "test_tokens": blocks["test"].tokens,
                      "perplexity_before_healing": results, "seconds": time.perf_counter() - started}))


if __name__ == "__main__":
    main()
