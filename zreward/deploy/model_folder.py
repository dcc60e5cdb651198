"""Model folders: a trained scorer saved so that every deploy command can load it and trust its scores.

A model folder holds what ``save_pretrained`` writes for the Qwen-VL model, its tokenizer and image processor,
plus ``zreward_model.json``::

    {"format_version": 1, "role": "student",
     "score_vocab": {"texts": ["1", ..., "9"], "values": [1.0, ..., 5.0], "token_ids": [...]},
     "dimensions": ["alignment", "realism", "aesthetics", "plausibility"],
     "rubric_version": "sha256:..."}

The scores a model gives are only meaningful with the score tokens and the prompts it was trained with, so
loading checks both: the score texts must still be single tokens of the folder's tokenizer with the recorded
ids, and ``rubric_version`` (a hash of every prompt template, :func:`rubric_version`) must equal this
package's. A folder without the file, or with a mismatch, is refused with a ``ValueError`` naming the file.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from zreward.scoring.rubric import ANSWER_PREFIX, DIMENSIONS, instruction
from zreward.scoring.scorer import ATTN_IMPLEMENTATIONS, RewardScorer, ScoringProcessor
from zreward.scoring.vocab import ScoreVocab
from zreward.training.checkpoint import honour_umask, move_into_place
from zreward.training.distributed import unwrap_model

METADATA_FILE = "zreward_model.json"
FORMAT_VERSION = 1
ROLES = ("student", "teacher")
DTYPES = ("float32", "bfloat16", "float16")


def rubric_version() -> str:
    """``sha256:<hex>`` of the dimensions, every prompt template (student and teacher) and the answer prefix."""
    templates = {d: [instruction("{prompt}", d, reasoning=r) for r in (False, True)] for d in DIMENSIONS}
    text = json.dumps({"dimensions": DIMENSIONS, "templates": templates, "answer_prefix": ANSWER_PREFIX},
                      sort_keys=True)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def save_model_folder(scorer: RewardScorer, path, role: str = "student") -> Path:
    """Write ``scorer``'s model, tokenizer, image processor and score vocabulary to the folder ``path``.

    Works on the scorer a trainer holds (``GDSOTrainer.scorer``, ``RISDTrainer.student``), DDP-wrapped or not.
    The folder is assembled next to ``path`` and moved into place, so a crash leaves no half-written folder; an
    existing model folder at ``path`` is replaced, any other non-empty folder is refused.
    """
    if not isinstance(scorer, RewardScorer):
        raise TypeError(f"scorer must be a RewardScorer, got {type(scorer).__name__}")
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    model = unwrap_model(scorer.model)
    if hasattr(model, "get_base_model"):
        raise ValueError("scorer.model is a peft model: merge its adapters first (model.merge_and_unload())")
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not (path / METADATA_FILE).is_file():
        raise ValueError(f"path {path} is a non-empty folder without {METADATA_FILE}: refusing to overwrite it")
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for weights in tmp.glob("*.safetensors"):  # safetensors leaves them 0600 whatever the umask
        honour_umask(weights)
    ScoringProcessor(scorer.tokenizer, scorer.image_processor).save_pretrained(tmp)
    vocab = scorer.vocab
    metadata = {"format_version": FORMAT_VERSION, "role": role,
                "score_vocab": {"texts": list(vocab.texts), "values": vocab.values.tolist(),
                                "token_ids": list(vocab.token_ids)},
                "dimensions": list(DIMENSIONS), "rubric_version": rubric_version()}
    (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=1) + "\n")
    move_into_place(tmp, path)
    return path


def read_metadata(path) -> dict:
    """The validated ``zreward_model.json`` of the model folder ``path`` (without the tokenizer check)."""
    file = Path(path) / METADATA_FILE
    if not file.is_file():
        raise ValueError(f"{file} not found: {path} is not a zreward model folder "
                         "(write one with zreward.deploy.model_folder.save_model_folder or `zreward demo`)")
    try:
        metadata = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{file}: not readable JSON ({error})") from None
    vocab = metadata.get("score_vocab") if isinstance(metadata, dict) else None
    if not isinstance(vocab, dict) or not all(isinstance(vocab.get(k), list) for k in ("texts", "values", "token_ids")):
        raise ValueError(f"{file}: needs a 'score_vocab' object with 'texts', 'values' and 'token_ids' lists")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{file}: format_version {metadata.get('format_version')!r} is not {FORMAT_VERSION}")
    if metadata.get("role") not in ROLES:
        raise ValueError(f"{file}: role must be one of {ROLES}, got {metadata.get('role')!r}")
    if metadata.get("rubric_version") != rubric_version():
        raise ValueError(f"{file}: rubric_version {metadata.get('rubric_version')!r} differs from this package's "
                         f"{rubric_version()!r}: the model was trained on other prompts, its scores would not mean "
                         "what the rubric says")
    return metadata


def load_model_folder(path, device: str | torch.device = "cpu", dtype: str = "float32",
                      attn_implementation: str = "sdpa", *, require_metadata: bool = True) -> RewardScorer:
    """A frozen, eval-mode ``RewardScorer`` on the model folder ``path``, its score vocabulary checked.

    ``require_metadata=False`` also accepts a plain ``save_pretrained`` folder without ``zreward_model.json``
    (it then gets the default score vocabulary); a folder that has the file is always checked.
    """
    from transformers import AutoModelForImageTextToText

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {attn_implementation!r}")
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"model folder {path} does not exist")
    checked = require_metadata or (path / METADATA_FILE).exists()
    metadata = read_metadata(path) if checked else None
    processor = ScoringProcessor.from_pretrained(path)
    vocab = _vocab(metadata, processor.tokenizer, path / METADATA_FILE) if checked \
        else ScoreVocab.from_tokenizer(processor.tokenizer)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, dtype))
    model = model.to(device).eval().requires_grad_(False)
    return RewardScorer(model, processor, vocab, attn_implementation=attn_implementation)


def load_folder_processor(path) -> tuple[ScoringProcessor, ScoreVocab]:
    """The tokenizer and image processor of the model folder ``path`` and its checked score vocabulary, without
    the weights: what runs next to a model served elsewhere (vLLM in this process or behind its HTTP server)."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"model folder {path} does not exist")
    metadata = read_metadata(path)
    processor = ScoringProcessor.from_pretrained(path)
    return processor, _vocab(metadata, processor.tokenizer, path / METADATA_FILE)


def _vocab(metadata: dict, tokenizer, file: Path) -> ScoreVocab:
    """The recorded score vocabulary, re-derived from the tokenizer; any difference is an error naming ``file``."""
    recorded = metadata["score_vocab"]
    try:
        vocab = ScoreVocab.from_tokenizer(tokenizer, recorded["texts"], recorded["values"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"{file}: score vocabulary does not fit the folder's tokenizer ({error})") from None
    if vocab.token_ids != recorded["token_ids"]:
        raise ValueError(f"{file}: score texts {recorded['texts']} are tokens {vocab.token_ids} of the folder's "
                         f"tokenizer, but the model was trained on tokens {recorded['token_ids']}")
    return vocab
