"""moe_ref: the reference implementation that accompanies the Mixture-of-Experts book.

Each module holds one idea and mirrors a chapter:

* :mod:`moe_ref.ffn`, :mod:`moe_ref.counting` (chapter 1): the dense FFN; parameters and FLOPs.
* :mod:`moe_ref.data`, :mod:`moe_ref.model`, :mod:`moe_ref.train` (chapter 1, used by all): the corpus with
  domain labels, the tiny transformer, the training loop.
* :mod:`moe_ref.book`: the device and scale knob of the notebooks.
"""

from .counting import attention_flops, count_params, ffn_flops, ffn_params
from .data import DOMAINS, Corpus, build_corpus, decode, encode
from .ffn import FFN
from .model import ModelConfig, TinyTransformer
from .train import History, TrainConfig, evaluate, train

__version__ = "0.1.0"

__all__ = [
    "FFN", "count_params", "ffn_params", "ffn_flops", "attention_flops",
    "DOMAINS", "Corpus", "build_corpus", "encode", "decode",
    "ModelConfig", "TinyTransformer", "TrainConfig", "History", "train", "evaluate",
]
