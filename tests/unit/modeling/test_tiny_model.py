"""The offline tiny Qwen2.5-VL: what build_tiny_model saves, how the processor sizes images, and SFT labels."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from services.modeling import (
    TinyModelSpec,
    build_prompt,
    build_tiny_model,
    count_parameters,
    load_model_and_processor,
    visual_tokens_for,
)
from services.modeling.batching import IGNORE_INDEX, generation_inputs, greedy_answers, training_inputs
from services.modeling.tiny import mrope_section

SPEC = TinyModelSpec(vocab_size=400, vision_hidden_size=64, vision_intermediate_size=64, vision_num_heads=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    folder = build_tiny_model(tmp_path_factory.mktemp("tiny"), SPEC, corpus=["How many squares are there? 3"])
    model, processor = load_model_and_processor(folder)
    return folder, model, processor


def _image(width: int, height: int, shade: int = 90) -> Image.Image:
    return Image.new("RGB", (width, height), (shade, 200 - shade, 30))


def test_saved_folder_has_what_transformers_and_vllm_read(tiny: tuple) -> None:
    folder, model, processor = tiny
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json",
                 "chat_template.jinja", "tiny_model_card.json"):
        assert (folder / name).is_file(), name
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    tokenizer = processor.tokenizer
    assert config["image_token_id"] == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert config["vision_start_token_id"] == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    card = json.loads((folder / "tiny_model_card.json").read_text())
    assert card["parameters"] == count_parameters(model)
    assert model.config.text_config.num_hidden_layers >= 3


@pytest.mark.parametrize(("width", "height"), [(224, 224), (448, 448), (308, 224), (896, 896)])
def test_the_processor_keeps_28_aligned_images_at_their_size(tiny: tuple, width: int, height: int) -> None:
    _, model, processor = tiny
    inputs = generation_inputs(processor, ["What shape is the red object?"], [_image(width, height)])
    expected = visual_tokens_for(height, width)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == expected
    assert inputs["image_grid_thw"].tolist() == [[1, height // 14, width // 14]]


def test_prompt_follows_the_qwen_chat_template(tiny: tuple) -> None:
    _, _, processor = tiny
    prompt = build_prompt(processor, "What digit is in row 2, column 3?")
    assert prompt == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>What digit is in row 2, column 3?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    with pytest.raises(ValueError, match="empty"):
        build_prompt(processor, "  ")


def test_bundled_answers_are_one_or_two_tokens(tiny: tuple) -> None:
    tokenizer = tiny[2].tokenizer
    for answer in ("red", "purple", "circle", "triangle", "top left", "bottom right", "yes", "no", "7", "3"):
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        assert 1 <= len(ids) <= 2, (answer, ids)
        assert tokenizer.decode(ids) == answer


def test_training_labels_cover_only_the_answer_and_its_end_token(tiny: tuple) -> None:
    _, model, processor = tiny
    answers = ["top left", "7"]
    batch = training_inputs(processor, ["Where is the red circle?", "What digit is in row 1, column 1?"],
                            [_image(224, 224), _image(224, 224, 40)], answers)
    end_id = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    for row, answer in enumerate(answers):
        labelled = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX].tolist()
        assert labelled == processor.tokenizer(answer, add_special_tokens=False)["input_ids"] + [end_id]
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss) and model.lm_head.weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_batched_greedy_answers_equal_one_at_a_time(tiny: tuple) -> None:
    _, model, processor = tiny
    questions = ["What colour is the circle?", "How many squares are there in this picture?"]
    images = [_image(224, 224, 10), _image(448, 224, 150)]
    batched = greedy_answers(model, processor, questions, images, max_new_tokens=4)
    alone = [greedy_answers(model, processor, [q], [i], max_new_tokens=4)[0] for q, i in zip(questions, images)]
    assert batched == alone


def test_spec_refuses_shapes_the_engines_cannot_run() -> None:
    with pytest.raises(ValueError, match="head_dim=48"):
        TinyModelSpec(hidden_size=192, num_attention_heads=4)
    with pytest.raises(ValueError, match="num_hidden_layers"):
        TinyModelSpec(num_hidden_layers=2)
    assert sum(mrope_section(32)) == 16 and sum(mrope_section(128)) == 64
    with pytest.raises(ValueError, match="multiple of 28"):
        visual_tokens_for(230, 224)
