"""Prompt rendering with the checkpoint's template agrees with mistral-common token for token."""

from __future__ import annotations

import pytest

from engine import api
from engine.chat import ChatFormatter
from engine.errors import InputError
from engine.images import num_image_tokens, prepare_image, token_grid


@pytest.fixture(scope="module")
def formatter(tiny_checkpoint):
    return ChatFormatter(tiny_checkpoint)


@pytest.fixture(scope="module")
def mistral_tokenizer(tiny_checkpoint):
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.from_file(str(tiny_checkpoint / "tekken.json"))


@pytest.mark.parametrize("effort", ["none", "high"])
def test_conversation_ids_match_mistral_common(formatter, mistral_tokenizer, effort):
    from mistral_common.protocol.instruct.chunk import TextChunk, ThinkChunk
    from mistral_common.protocol.instruct.messages import (
        AssistantMessage,
        SystemMessage,
        UserMessage,
    )
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    ours = formatter.build(
        [api.ChatMessage("user", "Hi"), api.ChatMessage("assistant", "Hello", reasoning="hmm"),
         api.ChatMessage("user", "2+2?")], "Be brief.", effort).ids
    request = ChatCompletionRequest(messages=[
        SystemMessage(content="Be brief."), UserMessage(content="Hi"),
        AssistantMessage(content=[ThinkChunk(thinking="hmm"), TextChunk(text="Hello")]),
        UserMessage(content="2+2?")], reasoning_effort=effort)
    assert ours == mistral_tokenizer.encode_chat_completion(request).tokens


def test_reasoning_effort_is_rendered_between_model_settings(formatter):
    ids = formatter.build([api.ChatMessage("user", "Hi")], "S", "high").ids
    assert 36 in ids and 37 in ids and ids.index(36) < ids.index(37) < ids.index(3)
    assert '"high"' in formatter.tokenizer.decode(ids[ids.index(36) + 1 : ids.index(37)])


@pytest.mark.parametrize("size", [(90, 60), (3000, 1000), (28, 28), (1, 500)])
def test_image_token_grid_matches_mistral_common(size, mistral_tokenizer):
    from PIL import Image

    encoder = mistral_tokenizer.instruct_tokenizer.image_encoder
    w_tokens, h_tokens = encoder._image_to_num_tokens(Image.new("RGB", size))
    assert token_grid(*size) == (h_tokens, w_tokens)
    assert num_image_tokens(*size) == h_tokens * (w_tokens + 1)


def test_image_prompt_layout(formatter, tmp_path):
    from PIL import Image

    path = tmp_path / "a.png"
    Image.new("RGBA", (60, 30), (255, 0, 0, 128)).save(path)
    prompt = formatter.build([api.ChatMessage("user", "What?", images=(path,))], "", "none")
    img = prepare_image(path)
    assert img.pixels.shape == (3, 56, 84)
    start = prompt.ids.index(10)
    assert prompt.ids[start : start + len(img.tokens)] == [10, 10, 10, 12, 10, 10, 10, 13]


def test_empty_prompt_is_refused(formatter):
    with pytest.raises(InputError, match="empty"):
        formatter.build([api.ChatMessage("user", "   ")], "", "none")


def test_unknown_reasoning_effort_is_refused(formatter):
    with pytest.raises(InputError, match="not supported"):
        formatter.build([api.ChatMessage("user", "hi")], "", "medium")


def test_image_that_is_not_an_image(formatter, tmp_path):
    bad = tmp_path / "cat.png"
    bad.write_text("this is text, not pixels")
    with pytest.raises(InputError, match="not an image"):
        formatter.build([api.ChatMessage("user", "hi", images=(bad,))], "", "none")


def test_truncated_image(formatter, tmp_path):
    from PIL import Image

    path = tmp_path / "cut.jpg"
    Image.effect_noise((200, 200), 50).convert("RGB").save(path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(InputError):
        formatter.build([api.ChatMessage("user", "hi", images=(path,))], "", "none")
