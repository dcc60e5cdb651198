"""The four reward dimensions, their five-anchor rubrics, and the scoring prompts (paper Sec. 2, 4.1).

Every prompt ends with ``ANSWER_PREFIX``: the token after it is the score token, so the score
distribution is read at the last position of the prompt (student) or of prompt + reasoning + prefix
(teacher). The 1-9 digit scale of ``zreward.scoring.vocab`` is spelled out in the prompt: odd digits are the
five rubric anchors, even digits the half-points between them.
"""
from __future__ import annotations

DIMENSIONS = ("alignment", "realism", "aesthetics", "plausibility")

DIMENSION_NAMES = {
    "alignment": "text-image alignment",
    "realism": "realism",
    "aesthetics": "aesthetics",
    "plausibility": "physical plausibility",
}

# Anchors for digits 9, 7, 5, 3, 1 (annotation scores 5, 4, 3, 2, 1): error patterns, not adjectives.
RUBRICS = {
    "alignment": (
        "every object, attribute, count, spatial relation and text in the prompt is depicted correctly",
        "one or two subtle deviations, such as a slightly wrong colour or count of a secondary object",
        "a salient error on a main subject: a missing object, a wrong attribute binding or a wrong relation",
        "several prompt elements are missing or wrong; only the general topic matches",
        "the image is unrelated to the prompt",
    ),
    "realism": (
        "indistinguishable from a photograph or a professional rendering of the intended style",
        "one or two subtle synthetic traces, such as over-smooth skin or slightly inconsistent textures",
        "clearly visible artefacts on the main subject: waxy surfaces, melted details, garbled text",
        "widespread artefacts; the image reads as generated at first glance",
        "noise, collapse or heavy distortion over most of the image",
    ),
    "aesthetics": (
        "strong composition, lighting and colour harmony; nothing to improve",
        "pleasing overall with one or two minor flaws in framing, lighting or colour",
        "noticeable problems: cluttered composition, flat lighting or clashing colours",
        "poor composition and lighting throughout",
        "no coherent composition; visually unpleasant",
    ),
    "plausibility": (
        "anatomy, physics, perspective, shadows and object interactions are all correct",
        "one or two subtle errors, such as a slightly wrong shadow or a minor perspective slip",
        "a salient structural error: extra or fused fingers, impossible poses, floating objects",
        "several structural errors on main subjects",
        "the scene is physically impossible throughout",
    ),
}

ANSWER_PREFIX = "Score: "

_SCALE = (
    "Answer with one digit from 1 to 9: 9 means score 5, 7 means 4, 5 means 3, 3 means 2, 1 means 1, "
    "and an even digit is the half-point between its neighbours (8 means 4.5)."
)


def check_dimension(dimension: str) -> str:
    if dimension not in RUBRICS:
        raise ValueError(f"dimension must be one of {DIMENSIONS}, got {dimension!r}")
    return dimension


def check_prompts(prompts, count: int) -> list[str]:
    """``prompts`` as a list of ``count`` generation prompts, one per image (``TypeError`` / ``ValueError``)."""
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a sequence of strings, one per image")
    prompts = list(prompts)
    if len(prompts) != count:
        raise ValueError(f"prompts must hold one prompt per image: got {len(prompts)} prompts for {count} images")
    return prompts


def rubric_text(dimension: str) -> str:
    """The rubric of ``dimension`` as prompt text, anchors from best (9) to worst (1)."""
    anchors = RUBRICS[check_dimension(dimension)]
    lines = [f"{digit}: {anchor}." for digit, anchor in zip((9, 7, 5, 3, 1), anchors)]
    return "\n".join(lines)


def instruction(prompt: str, dimension: str, *, reasoning: bool = False) -> str:
    """The user turn: rate the image for ``dimension`` given the generation ``prompt``.

    With ``reasoning`` the model is asked to think first and finish with ``ANSWER_PREFIX`` + digit
    (the teacher); without, to answer directly (the student). Everything before the rubric is the same for an
    image's four dimensions, so a scorer computes it once per image (``zreward.scoring.shared_prefix``).
    """
    name = DIMENSION_NAMES[check_dimension(dimension)]
    how = (f"Reason step by step about the image, then finish with a line '{ANSWER_PREFIX}<digit>'."
           if reasoning else f"Reply with '{ANSWER_PREFIX}<digit>' only.")
    return (
        f"Rate the image generated for the prompt below on the rubric below. {_SCALE} {how}\n"
        f"Prompt: {prompt}\n"
        f"Rubric ({name}):\n{rubric_text(dimension)}"
    )


def messages(prompt: str, dimension: str, *, reasoning: bool = False) -> list[dict]:
    """Chat messages with one image placeholder, in the Qwen-VL content-list format."""
    return [{"role": "user", "content": [
        {"type": "image"},
        {"type": "text", "text": instruction(prompt, dimension, reasoning=reasoning)},
    ]}]


def chat_prompt(tokenizer, prompt: str, dimension: str, *, reasoning: bool = False) -> str:
    """Chat-templated prompt text with one ``<|image_pad|>``-style placeholder.

    Student prompts (``reasoning=False``) disable thinking and end with ``ANSWER_PREFIX``; teacher prompts end
    with the generation prompt (the answer prefix is appended after the sampled reasoning).
    """
    text = tokenizer.apply_chat_template(
        messages(prompt, dimension, reasoning=reasoning), tokenize=False, add_generation_prompt=True,
        enable_thinking=reasoning,
    )
    return text if reasoning else text + ANSWER_PREFIX
