"""Scoring through vLLM's OpenAI-compatible server: the chat requests that read a model folder's score
distribution, and their answers turned back into score distributions.

vLLM serves a model folder as it is (``python -m vllm.entrypoints.openai.api_server --model FOLDER``). Per
(image, dimension) the client sends one ``POST /v1/chat/completions``::

    {"messages": [{"role": "user", "content": [{"type": "image_url", ...}, {"type": "text", "text": rubric}]},
                  {"role": "assistant", "content": "<what the generation prompt adds>Score: "}],
     "continue_final_message": true, "add_generation_prompt": false,
     "chat_template_kwargs": {"enable_thinking": false},
     "max_tokens": 1, "logprobs": true, "logprob_token_ids": [K score ids], "return_tokens_as_token_ids": true}

The messages are the package's rubric prompt for the dimension (``zreward.scoring.rubric``, whose version the
folder's ``zreward_model.json`` must match) with the assistant turn pre-filled up to the answer prefix, so the
server's chat template renders exactly the text the in-process scorer tokenises (``chat_prompt``); this is
checked once against the folder's own template when the client starts. The answer carries the full-vocabulary
log-probs of the K score ids, renormalised over the K bins as :class:`~zreward.engines.vllm.VLLMEngine` does.
Images are resized to the processor's target size and rounded to 8 bits here, as the in-process engine does, and
sent as lossless PNG, so the server's processor gets the pixels the in-process scorer sees.
"""
from __future__ import annotations

import base64
import io
from collections.abc import Sequence

from zr_kernels import ScoreDist
from zreward.deploy.images import to_float_chw
from zreward.deploy.model_folder import load_folder_processor
from zreward.engines.vllm import engine_images, renormalise_score_logprobs
from zreward.scoring.rubric import ANSWER_PREFIX, DIMENSIONS, chat_prompt, messages
from zreward.scoring.scorer import reshape_scores

CHAT_PATH = "/v1/chat/completions"
_MARK = "\x00zreward-assistant\x00"  # stands for the assistant text while locating the generation prompt


class ChatScoring:
    """Builds the chat requests for the model folder ``model_folder`` and reads their answers.

    ``served_model``: the ``model`` field of each request (vLLM's ``--served-model-name``); None leaves it out,
    and vLLM answers with the one model it serves. Raises ``ValueError`` when the folder's chat template cannot
    reproduce the scoring prompt through the chat API.
    """

    def __init__(self, model_folder, served_model: str | None = None):
        processor, self.vocab = load_folder_processor(model_folder)
        self.tokenizer, self.image_processor = processor.tokenizer, processor.image_processor
        self.score_ids = list(self.vocab.token_ids)
        self.served_model = served_model
        self.prefill = _assistant_prefill(self.tokenizer) + ANSWER_PREFIX
        for dimension in DIMENSIONS:
            rendered = self.tokenizer.apply_chat_template(
                self._messages("a red cube", dimension, {"type": "image"}), tokenize=False,
                continue_final_message=True, add_generation_prompt=False, enable_thinking=False)
            if rendered != chat_prompt(self.tokenizer, "a red cube", dimension):
                raise ValueError(f"the chat template of {model_folder} does not render the scoring prompt when the "
                                 "assistant turn is pre-filled, so vLLM's chat API cannot score with it")

    def image_url(self, image, name: str = "image") -> str:
        """One image (any form ``zreward.deploy.images`` takes) as the PNG data URL the server gets: resized to
        the processor's target size and rounded to 8 bits, as the in-process vLLM engine prepares it."""
        _, (pil,) = engine_images(to_float_chw(image, name).unsqueeze(0), self.image_processor)
        buffer = io.BytesIO()
        pil.save(buffer, format="PNG", compress_level=1)
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")

    def body(self, image_url: str, prompt: str, dimension: str) -> dict:
        """The chat request whose one generated position carries the score distribution."""
        body = {"messages": self._messages(prompt, dimension, {"type": "image_url", "image_url": {"url": image_url}}),
                "continue_final_message": True, "add_generation_prompt": False,
                "chat_template_kwargs": {"enable_thinking": False},
                "max_tokens": 1, "temperature": 0.0, "logprobs": True, "logprob_token_ids": self.score_ids,
                "return_tokens_as_token_ids": True}
        if self.served_model is not None:
            body["model"] = self.served_model
        return body

    def score_logprobs(self, answer: dict) -> list[float]:
        """The K score ids' log-probs in score-bin order from a chat completion; ``ValueError`` if any is missing
        (the server ignored ``logprob_token_ids``: an older vLLM, or not vLLM)."""
        try:
            entries = answer["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
            by_token = {entry["token"]: entry["logprob"] for entry in entries}
        except (KeyError, IndexError, TypeError):
            raise ValueError("the chat completion carries no log-probs at its first position") from None
        missing = [t for t in self.score_ids if f"token_id:{t}" not in by_token]
        if missing:
            raise ValueError(f"the chat completion has no log-probs for score token ids {missing}: the server "
                             "does not honour logprob_token_ids (vLLM >= 0.32 does)")
        return [float(by_token[f"token_id:{t}"]) for t in self.score_ids]

    def distributions(self, logprobs: Sequence[Sequence[float]], images: int, dimensions: int) -> ScoreDist:
        """``[images, dimensions, K]`` distributions from the rows of ``score_logprobs`` in (image, dimension)
        order."""
        return reshape_scores(renormalise_score_logprobs(logprobs, self.vocab.values), (images, dimensions))

    def _messages(self, prompt: str, dimension: str, image_part: dict) -> list[dict]:
        """The rubric's user turn (``zreward.scoring.rubric.messages``) and the assistant turn pre-filled up to the
        answer prefix."""
        user = messages(prompt, dimension)
        user[0]["content"][0] = image_part  # the rubric's image placeholder
        return user + [{"role": "assistant", "content": self.prefill}]


def _assistant_prefill(tokenizer) -> str:
    """What the chat template's generation prompt (thinking off) adds after the assistant turn's own header, e.g.
    an empty ``<think>`` block: pre-filling it reproduces the generation prompt inside an assistant turn."""
    user = messages("a red cube", DIMENSIONS[0])
    generation = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True,
                                               enable_thinking=False)
    with_turn = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": _MARK}], tokenize=False,
                                              enable_thinking=False)
    header = with_turn[:with_turn.index(_MARK)] if _MARK in with_turn else None
    if header is None or not generation.startswith(header):
        raise ValueError("the chat template's generation prompt is not the start of an assistant turn: vLLM's chat "
                         "API cannot reproduce the scoring prompt")
    return generation[len(header):]
