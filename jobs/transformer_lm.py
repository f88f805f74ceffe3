"""Character-level decoder-only transformer on Python's own standard-library source code.

    orchestrate job=transformer_lm
    orchestrate job=transformer_lm job.n_layer=6 job.d_model=256 job.text_file=/abs/corpus.txt

Held out: the corpus' last `job.held_out`. Metric: bits per character. Reference: the best
interpolated Kneser-Ney character n-gram (order ≤ 5 and discount tuned on training data)."""

import math
import sysconfig
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from orchestrator import ngram
from orchestrator.config import JobConfig
from orchestrator.job import EpochEnd, JobSpec, Splits

# About 1.5 M characters of Python; the held-out tail is the last modules (traceback, optparse).
MODULES = """argparse calendar configparser csv dataclasses difflib fractions functools heapq
inspect typing tarfile zipfile subprocess enum ast pickle pathlib random shutil statistics
string textwrap threading optparse traceback""".split()
UNK = "\x00"  # every character outside the vocabulary becomes this one (id 0)


@dataclass
class TransformerLmConfig(JobConfig):
    name: str = "transformer_lm"
    text_file: str | None = None  # absolute path of a UTF-8 text; None = stdlib sources
    max_chars: int = 1_500_000
    held_out: float = 0.1  # tail fraction of the character stream
    min_char_count: int = 3  # rarer characters (in the training part) become UNK
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    dropout: float = 0.1
    tie_weights: bool = True
    sample_prompt: str = "def "  # the last epoch logs 400 characters sampled from it


def build_data(cfg: TransformerLmConfig) -> Splits:
    if cfg.text_file is not None and not Path(cfg.text_file).is_file():
        raise ValueError(f"job.text_file: no such file '{cfg.text_file}'")
    stdlib = [Path(sysconfig.get_paths()["stdlib"], f"{m}.py") for m in MODULES]
    files = [Path(cfg.text_file)] if cfg.text_file else stdlib
    text = "\n".join(f.read_text("utf-8", errors="replace") for f in files)[: cfg.max_chars]
    cut = int(len(text) * (1 - cfg.held_out))
    counts = Counter(text[:cut])
    chars = [UNK] + sorted(c for c, n in counts.items() if n >= cfg.min_char_count and c != UNK)
    index = {c: i for i, c in enumerate(chars)}
    # C-level passes, not a Python loop per character: every worker builds this (1.5 M chars).
    text = text.translate({ord(c): UNK for c in set(text) - index.keys()})  # the n-gram sees it
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)  # one code point each
    lookup = np.zeros(int(codes.max()) + 1, dtype=np.int64)
    lookup[[ord(c) for c in chars]] = np.arange(len(chars))
    ids = torch.from_numpy(lookup[codes])
    b = cfg.block_size  # non-overlapping windows of b + 1: (input, next-character target)
    tr, va = ids[:cut].unfold(0, b + 1, b), ids[cut:].unfold(0, b + 1, b)
    info = {"chars": chars, "text": text, "cut": cut, "val_chars": len(va) * b}
    return Splits(TensorDataset(tr[:, :-1], tr[:, 1:]), TensorDataset(va[:, :-1], va[:, 1:]), info)


class Block(nn.Module):  # pre-norm: x + attention(norm(x)), then x + mlp(norm(x))
    def __init__(self, d: int, heads: int, p: float):
        super().__init__()
        self.heads, self.p, self.ln1, self.ln2 = heads, p, nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out, self.drop = nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Dropout(p)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(self.ln1(x)).view(*x.shape[:2], 3, self.heads, -1).transpose(1, 3).unbind(2)
        a = F.scaled_dot_product_attention(*qkv, dropout_p=self.p * self.training, is_causal=True)
        x = x + self.drop(self.out(a.transpose(1, 2).reshape(x.shape)))
        return x + self.drop(self.mlp(self.ln2(x)))


class CharTransformer(nn.Module):
    def __init__(self, cfg: TransformerLmConfig, splits: Splits):
        super().__init__()
        d, vocab = cfg.d_model, len(splits.info["chars"])
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(cfg.block_size, d)
        layers = [Block(d, cfg.n_head, cfg.dropout) for _ in range(cfg.n_layer)]
        self.body = nn.Sequential(nn.Dropout(cfg.dropout), *layers, nn.LayerNorm(d))
        self.head = nn.Linear(d, vocab, bias=False)
        if cfg.tie_weights:
            self.head.weight = self.tok.weight
        for p in (p for p in self.parameters() if p.dim() == 2):  # GPT-2's small init
            nn.init.normal_(p, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T) ids → (B, T, vocab) logits
        return self.head(self.body(self.tok(x) + self.pos(torch.arange(x.shape[1]).to(x))))


def eval_step(model: nn.Module, batch) -> dict[str, torch.Tensor]:
    x, y = batch  # blocks have one length, so per-block means average per character
    ce = F.cross_entropy(model(x).transpose(1, 2).float(), y, reduction="none").mean(1)
    return {"loss": ce, "bpc": ce / math.log(2)}


def references(cfg: TransformerLmConfig, splits: Splits) -> dict[str, float]:
    """The best interpolated Kneser-Ney character n-gram (order ≤ 5, discount tuned on the
    training part's tail), scored on the held-out blocks' target characters."""
    text, cut, vocab = splits.info["text"], splits.info["cut"], len(splits.info["chars"])
    held_out = range(cut + 1, cut + 1 + splits.info["val_chars"])
    bpc, n, d = ngram.tuned_kneser_ney_bits(text, cut, held_out, vocab, max_order=5)
    return {"ngram_bpc": bpc, "ngram_order": float(n), "ngram_discount": d}


def sample_report(end: EpochEnd) -> dict[str, float]:
    if end.is_last:  # a fixed prompt and generator seed: samples comparable across runs
        chars, size, gen = end.splits.info["chars"], end.config.block_size, torch.Generator()
        gen.manual_seed(0)
        ids = [chars.index(c) if c in chars else 0 for c in end.config.sample_prompt]
        for _ in range(400):
            logits = end.model(torch.tensor([ids[-size:]], device=end.device))[0, -1].float().cpu()
            ids.append(int(torch.multinomial(logits.softmax(-1), 1, generator=gen)))
        end.log_text("sample", "".join(chars[i] for i in ids))
    return {}


JOB = JobSpec(
    config=TransformerLmConfig,
    build_data=build_data,
    build_model=CharTransformer,
    training_step=lambda model, batch: eval_step(model, batch)["loss"].mean(),
    eval_step=eval_step,
    main_metric="val/bpc",
    mode="min",
    evaluate=sample_report,
    references=references,
)
