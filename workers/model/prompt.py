"""Every word the model is prompted with. The video comes before the question, so the
``[system][video]`` prefix is the same token for token for every question about one video, and its
KV cache can be reused.
"""

from __future__ import annotations

SYSTEM_PROMPT = "You are a helpful assistant."
"""The default system prompt of the Qwen2.5-VL chat template (what the model was tuned with)."""

GROUNDING_QUESTION = ("Give the query: '{query}', when does the described content occur in the video? "
                      "If it does not occur in the video, answer: {absent}")
"""The official Qwen2.5-VL cookbook wording (video_understanding, temporal grounding), plus the one
sentence the model answers with when the event is not there, so "not in this video" is an answer."""

ABSENT_ANSWER = "The given query does not occur in the video."
"""The answer that means "not found". Its probability under the model gives each answer's score."""

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
VIDEO_PAD = "<|video_pad|>"


def sanitize_query(query: str) -> str:
    """Collapse whitespace and defuse control-token look-alikes (``<|...|>``) a caller could inject."""
    return " ".join(query.split()).replace("<|", "< |").replace("|>", "| >")


def grounding_question(query: str) -> str:
    return GROUNDING_QUESTION.format(query=sanitize_query(query), absent=ABSENT_ANSWER)


def grounding_messages(query: str) -> list[dict]:
    """Chat messages (transformers chat-template format) for one grounding question."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": grounding_question(query)}]},
    ]


def video_prefix_text(n_video_tokens: int) -> str:
    """``[system][video]``: what the chat template renders before the question, video expanded."""
    return (f"{IM_START}system\n{SYSTEM_PROMPT}{IM_END}\n{IM_START}user\n"
            f"{VISION_START}{VIDEO_PAD * n_video_tokens}{VISION_END}")


def question_suffix_text(query: str) -> str:
    """The question and the assistant turn opener that follow the video prefix."""
    return f"{grounding_question(query)}{IM_END}\n{IM_START}assistant\n"
