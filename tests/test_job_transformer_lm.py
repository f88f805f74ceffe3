"""The transformer_lm job in one process: config, data split, n-gram reference, sample artifact."""

import math

import pytest
import torch

from jobs import transformer_lm as lm
from orchestrator import ngram
from orchestrator.cli import compose_config
from orchestrator.context import LocalContext
from orchestrator.job import EpochEnd, job_config
from orchestrator.loop import run

SMALL = [
    "job=transformer_lm",
    "job.max_chars=20000",
    "job.block_size=32",
    "job.n_layer=1",
    "job.d_model=32",
    "trainer.max_epochs=1",
    "trainer.batch_size=32",
]


def config(overrides=()):
    return job_config(lm.JOB, compose_config([*SMALL, *overrides])["job"])


def test_default_config_composes():
    cfg = compose_config(["job=transformer_lm"])
    assert cfg["job"]["name"] == "transformer_lm" and cfg["job"]["text_file"] is None


def test_a_few_steps_train_to_a_finite_bits_per_character():
    result = run(compose_config(SMALL), LocalContext())
    assert result.status == "finished" and result.step > 0
    bpc = result.metrics["val/bpc"]
    assert math.isfinite(bpc) and 0 < bpc < math.log2(100)
    assert bpc == pytest.approx(result.metrics["val/loss"] / math.log(2))


def test_data_is_deterministic_and_held_out_is_the_streams_tail():
    cfg = config()
    a, b = lm.build_data(cfg), lm.build_data(cfg)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0])
    info, chars = a.info, a.info["chars"]
    cut, val_x, val_y = info["cut"], *a.val.tensors
    assert cut == int(20000 * 0.9) and val_x.shape[1] == 32
    # Training windows never reach the held-out tail; held-out targets are the n-gram's chars.
    assert a.train.tensors[1].numel() <= cut
    targets = "".join(chars[i] for i in val_y.flatten().tolist())
    assert targets == info["text"][cut + 1 : cut + 1 + info["val_chars"]]
    assert torch.equal(val_x[:, 1:], val_y[:, :-1])


def test_text_file_is_used_and_a_missing_one_is_a_clear_error(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("hello world\n" * 500)
    splits = lm.build_data(config([f"job.text_file={path}"]))
    assert set(splits.info["chars"]) == {lm.UNK, *"helo wrd\n"}
    with pytest.raises(ValueError, match="job.text_file"):
        lm.build_data(config([f"job.text_file={tmp_path / 'missing.txt'}"]))


def test_kneser_ney_is_a_normalised_distribution():
    text, vocab = "abracadabra cabbage bar " * 20, 8
    base = text[:-3]
    for n in (1, 3, 5):
        total = sum(
            2
            ** -ngram.kneser_ney_bits(
                base + c, len(base), range(len(base), len(base) + 1), n, 0.8, vocab
            )
            for c in "abrcdge "
        )
        assert total == pytest.approx(1.0)


def test_kneser_ney_beats_a_unigram_and_more_context_helps_on_real_text():
    splits = lm.build_data(config())  # 20 000 characters of Python
    text, cut, vocab = splits.info["text"], 16_000, len(splits.info["chars"])
    counts = ngram.kneser_ney_counts(text, cut, 5)
    score = range(cut, len(text))
    bits = [ngram.kneser_ney_bits(text, cut, score, n, 0.75, vocab, counts) for n in (1, 3, 5)]
    assert bits[0] > bits[1] > bits[2] and bits[0] < math.log2(vocab)


def test_reference_ngram_is_tuned_and_scored_on_the_held_out_characters():
    cfg = config()
    splits = lm.build_data(cfg)
    ref = lm.references(cfg, splits)
    assert 1 <= ref["ngram_order"] <= 5
    info = splits.info
    held_out = range(info["cut"] + 1, info["cut"] + 1 + info["val_chars"])
    order, d = int(ref["ngram_order"]), ref["ngram_discount"]
    bits = ngram.kneser_ney_bits(info["text"], info["cut"], held_out, order, d, len(info["chars"]))
    assert ref["ngram_bpc"] == pytest.approx(bits)


def test_weight_tying_switch_shares_the_embedding():
    splits = lm.build_data(config())
    tied = lm.CharTransformer(config(), splits)
    untied = lm.CharTransformer(config(["job.tie_weights=false"]), splits)
    assert tied.head.weight is tied.tok.weight and untied.head.weight is not untied.tok.weight
    assert sum(p.numel() for p in untied.parameters()) > sum(p.numel() for p in tied.parameters())


class Sink:
    def __init__(self):
        self.texts = {}

    def log_image(self, name, image, epoch):
        raise AssertionError("no images expected")

    def log_text(self, name, text, epoch):
        self.texts[(name, epoch)] = text


def test_sample_is_logged_on_the_last_epoch_and_is_reproducible():
    cfg = config(["job.sample_prompt=def f"])
    splits = lm.build_data(cfg)
    model = lm.CharTransformer(cfg, splits).eval()
    sinks = [Sink() for _ in range(3)]
    for epoch, sink in zip((1, 2, 2), sinks, strict=True):
        lm.sample_report(EpochEnd(model, splits, cfg, epoch, 2, torch.device("cpu"), sink))
    assert sinks[0].texts == {}
    (text,) = sinks[1].texts.values()
    assert text.startswith("def f") and len(text) == len("def f") + 400
    assert sinks[2].texts == sinks[1].texts
