"""Training: the code corpus, the n-gram baseline, the resumable trainer and the bundled family."""

from looptune.train.corpus import heldout_texts, load_corpus
from looptune.train.trainer import TrainResult, train

__all__ = ["TrainResult", "heldout_texts", "load_corpus", "train"]
