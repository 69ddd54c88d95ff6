"""Text to train the benchmark tokenizer on and to fill prompts with: Python sources and docs shipped with the
interpreter and mlx-lm."""

import functools
import random
import sysconfig
from pathlib import Path

STDLIB_PACKAGES = ("asyncio", "json", "email", "http", "logging", "unittest")


@functools.cache
def corpus_files() -> list[Path]:
    import mlx_lm

    roots = [Path(sysconfig.get_paths()["stdlib"]) / name for name in STDLIB_PACKAGES]
    roots.append(Path(mlx_lm.__file__).parent)
    files = []
    for root in roots:
        files += sorted(p for p in root.rglob("*.py") if "test" not in p.parts)
    return files


@functools.cache
def corpus_texts() -> tuple[str, ...]:
    return tuple(p.read_text(errors="replace") for p in corpus_files())


def filler(tokenizer, n_tokens: int, seed: int) -> str:
    """About `n_tokens` tokens of real-looking text (a shuffled run of source paragraphs)."""
    rng = random.Random(seed)
    paragraphs = [p for text in corpus_texts() for p in text.split("\n\n") if 40 < len(p) < 2000]
    out, count = [], 0
    while count < n_tokens:
        p = rng.choice(paragraphs)
        out.append(p)
        count += len(tokenizer.encode(p, add_special_tokens=False)) + 1
    text = "\n\n".join(out)
    ids = tokenizer.encode(text, add_special_tokens=False)[:n_tokens]
    return tokenizer.decode(ids)
