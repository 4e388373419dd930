"""What the book's notebooks use beside the library: the corpus, the tiny transformer, the training loop,
the notebooks' device and scale knob, and the benchmarks (:mod:`moe_ref.book.bench`, run as
``python -m moe_ref.bench``). None of it is needed to use an MoE layer in your own model."""

from .data import DOMAINS, Corpus, build_corpus, decode, encode
from .model import ModelConfig, TinyTransformer
from .settings import Settings, settings
from .train import History, TrainConfig, evaluate, train

__all__ = ["DOMAINS", "Corpus", "build_corpus", "encode", "decode", "ModelConfig", "TinyTransformer",
           "Settings", "settings", "TrainConfig", "History", "train", "evaluate"]
