"""The chat requests ``RewardClient(api="openai")`` sends to vLLM's server, and how their answers are read (no server:
tests/test_deploy_vllm_server.py runs them against a real one)."""
import json
import math

import pytest
import torch

from tests.deploy_helpers import save_tiny_student, uint8_images
from zreward.deploy.openai_api import ChatScoring
from zreward.scoring.rubric import ANSWER_PREFIX, DIMENSIONS, chat_prompt


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_student(tmp_path_factory.mktemp("models"), seed=3)


@pytest.fixture(scope="module")
def chat(folder):
    return ChatScoring(folder)


def test_request_renders_the_scoring_prompt(chat):
    body = chat.body(chat.image_url(uint8_images(1)[0]), "a red cube", "realism")
    assert body["max_tokens"] == 1 and body["logprobs"] is True and body["continue_final_message"] is True
    assert body["logprob_token_ids"] == list(chat.vocab.token_ids) and "model" not in body
    user, assistant = body["messages"]
    assert user["content"][0]["type"] == "image_url" and assistant["content"].endswith(ANSWER_PREFIX)
    # What the server's chat template makes of it (the image part as vLLM passes it to the template):
    user["content"][0] = {"type": "image"}
    rendered = chat.tokenizer.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=False,
                                                  continue_final_message=True, **body["chat_template_kwargs"])
    assert rendered == chat_prompt(chat.tokenizer, "a red cube", "realism")


def test_served_model_name(folder):
    assert ChatScoring(folder, "student-v1").body("data:,", "p", "realism")["model"] == "student-v1"


def test_answers_are_renormalised_over_the_score_ids(chat):
    logits = torch.randn(len(chat.score_ids), generator=torch.Generator().manual_seed(0)).tolist()
    shift = -7.25  # vLLM's log-probs are over the full vocabulary: off by a constant per row
    answer = {"choices": [{"logprobs": {"content": [{"top_logprobs": [
        {"token": f"token_id:{t}", "logprob": x + shift} for t, x in zip(chat.score_ids, logits)] + [
        {"token": "token_id:0", "logprob": -0.01}]}]}}]}
    dist = chat.distributions([chat.score_logprobs(answer)], 1, 1)
    torch.testing.assert_close(dist.probs.reshape(-1), torch.softmax(torch.tensor(logits), 0), rtol=0, atol=1e-6)
    assert math.isclose(float(dist.mean), float(torch.softmax(torch.tensor(logits), 0) @ chat.vocab.values),
                        abs_tol=1e-5)
    answer["choices"][0]["logprobs"]["content"][0]["top_logprobs"].pop(0)
    with pytest.raises(ValueError, match=rf"no log-probs for score token ids \[{chat.score_ids[0]}\]"):
        chat.score_logprobs(answer)
    with pytest.raises(ValueError, match="no log-probs at its first position"):
        chat.score_logprobs({"choices": [{"logprobs": None}]})


def test_a_template_that_cannot_be_prefilled_is_refused(folder, tmp_path):
    import shutil

    copy = shutil.copytree(folder, tmp_path / "copy")
    template = copy / "chat_template.jinja"
    # A template whose generation prompt is not the start of an assistant turn.
    template.write_text(template.read_text().replace("'<|im_start|>assistant\\n' -}}", "'<|im_start|>model\\n' -}}"))
    with pytest.raises(ValueError, match="generation prompt is not the start of an assistant turn"):
        ChatScoring(copy)
    assert json.loads((copy / "zreward_model.json").read_text())["dimensions"] == list(DIMENSIONS)
