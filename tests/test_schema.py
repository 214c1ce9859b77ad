"""The model's input schema and the prediction object, both response shapes."""

from __future__ import annotations

import pytest

from kontext.errors import InputValidationError
from kontext.schema import ASPECT_RATIOS, OUTPUT_SIZES, EditInput, Prediction

IMAGE = "https://images.example/mug.jpg"


def test_defaults_match_the_model_schema():
    edit = EditInput(prompt="make it red", input_image=IMAGE)
    assert edit.to_api() == {
        "prompt": "make it red",
        "input_image": IMAGE,
        "aspect_ratio": "match_input_image",
        "num_inference_steps": 28,
        "guidance": 2.5,
        "output_format": "webp",
        "output_quality": 80,
        "disable_safety_checker": False,
        "go_fast": True,
    }
    assert set(ASPECT_RATIOS) == set(OUTPUT_SIZES) | {"match_input_image"}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("aspect_ratio", "7:3"),
        ("num_inference_steps", 3),
        ("num_inference_steps", 51),
        ("num_inference_steps", "28"),
        ("guidance", -0.1),
        ("guidance", 10.5),
        ("output_format", "gif"),
        ("output_quality", 101),
        ("go_fast", "yes"),
        ("disable_safety_checker", 1),
        ("seed", 1.5),
        ("prompt", "   "),
        ("input_image", "ftp://host/x.jpg"),
        ("input_image", "data:text/plain,hello"),
        ("steps", 10),
    ],
)
def test_bad_values_are_named_before_anything_is_sent(field, value):
    data = {"prompt": "make it red", "input_image": IMAGE, field: value}
    with pytest.raises(InputValidationError) as info:
        EditInput.parse(data)
    assert info.value.fields == [field]
    assert field in str(info.value)


def test_input_hash_changes_with_any_input():
    base = EditInput(prompt="make it red", input_image=IMAGE)
    assert base.input_hash() == EditInput(prompt="make it red", input_image=IMAGE).input_hash()
    for change in ({"prompt": "make it blue"}, {"seed": 7}, {"output_format": "png"}, {"go_fast": False}):
        assert base.model_copy(update=change).input_hash() != base.input_hash()


def test_prediction_accepts_both_shapes():
    replicate = Prediction.from_api(
        {
            "id": "gm3qorzdhgbfurvjtvhg6dckhu",
            "model": "black-forest-labs/flux-kontext-dev",
            "version": "hidden",
            "input": {"prompt": "x"},
            "output": "https://replicate.delivery/x/out.jpg",
            "data_removed": False,
            "error": None,
            "status": "succeeded",
            "created_at": "2026-11-23T10:00:00.000Z",
            "urls": {"get": "g", "cancel": "c", "web": "w"},
            "metrics": {"predict_time": 3.2},
        }
    )
    assert replicate.output_urls == ["https://replicate.delivery/x/out.jpg"]
    assert replicate.predict_time == 3.2 and replicate.is_terminal and not replicate.synthetic

    proxy = Prediction.from_api(
        {"created": 1589478378, "data": [{"url": "https://a/1.png"}, {"url": "https://a/2.png"}]}
    )
    assert proxy.status == "succeeded" and proxy.synthetic
    assert proxy.output_urls == ["https://a/1.png", "https://a/2.png"]
    assert proxy.created_at is not None and proxy.created_at.year == 2020

    listed = Prediction.from_api({"id": "a", "status": "processing", "output": ["u1", "u2"]})
    assert listed.output_urls == ["u1", "u2"] and not listed.is_terminal
    aborted = Prediction.from_api({"id": "b", "status": "aborted"})
    assert aborted.is_terminal


def test_unknown_shapes_are_refused():
    with pytest.raises(ValueError):
        Prediction.from_api({"created": 1, "data": []})
    with pytest.raises(ValueError):
        Prediction.from_api(["not", "an", "object"])
