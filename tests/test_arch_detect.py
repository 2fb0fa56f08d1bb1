"""Architecture detection from a checkpoint's {key: shape}."""

from __future__ import annotations

import time

import pytest

from loraforge.errors import FormatError
from loraforge.formats.arch import ARCHITECTURE_NAMES, detect_architecture, get_architecture

SD_NAMES = tuple(n for n in ARCHITECTURE_NAMES if n != "flux")  # Flux: tests/test_flux.py
from loraforge.testing.arch import architecture_at, tiny_architecture

UNET = "model.diffusion_model."


def shapes_of(name: str, size: str = "full", components=None) -> dict[str, tuple[int, ...]]:
    arch = architecture_at(name, size)
    return {t.key: t.shape for t in arch.tensors if components is None or t.component in components}


@pytest.mark.parametrize("size", ["full", "tiny"])
@pytest.mark.parametrize("name", SD_NAMES)
def test_detects_each_table(name, size):
    detection = detect_architecture(shapes_of(name, size))
    assert detection.architecture is architecture_at(name, size)
    assert (detection.inpaint, detection.v_prediction, detection.missing, detection.extra) == (False, None, (), ())


@pytest.mark.parametrize("name", SD_NAMES)
def test_checkpoint_without_vae_and_other_tensors_reports_them_missing(name):
    arch = get_architecture(name)
    shapes = shapes_of(name, components={"unet", "te", "te1", "te2"})
    detection = detect_architecture(shapes)
    assert detection.architecture is arch
    assert detection.missing == tuple(t.key for t in arch.tensors if t.component in ("vae", "other"))
    assert detection.extra == ()


def test_unet_only_file_is_still_told_apart_by_shapes():
    for name in ("sd1", "sd2"):
        for size in ("full", "tiny"):
            detection = detect_architecture(shapes_of(name, size, components={"unet"}))
            # The UNet shows its own dimensions; a file without text encoder and VAE cannot show theirs.
            unet_dims = ("model_channels", "context")
            expected = dict(architecture_at(name, size).dimensions)
            assert detection.architecture.name == name
            assert {k: v for k, v in detection.architecture.dimensions if k in unet_dims} == {
                k: expected[k] for k in unet_dims
            }


def test_marker_tensors_are_extra_and_v_pred_sets_v_prediction():
    shapes = shapes_of("sdxl") | {"v_pred": (), "ztsnr": ()}
    detection = detect_architecture(shapes)
    assert detection.architecture.name == "sdxl"
    assert detection.v_prediction is True
    assert detection.extra == ("v_pred", "ztsnr")
    assert detect_architecture(shapes_of("sd2") | {"ztsnr": ()}).v_prediction is None


def test_sd1_inpaint_conv_in():
    shapes = shapes_of("sd1")
    shapes[UNET + "input_blocks.0.0.weight"] = (320, 9, 3, 3)
    detection = detect_architecture(shapes)
    assert detection.architecture.name == "sd1" and detection.inpaint is True
    tiny = shapes_of("sd1", "tiny")
    tiny[UNET + "input_blocks.0.0.weight"] = (16, 9, 3, 3)
    assert detect_architecture(tiny).inpaint is True


def test_other_conv_in_channel_counts_are_not_accepted():
    shapes = shapes_of("sd1")
    shapes[UNET + "input_blocks.0.0.weight"] = (320, 8, 3, 3)
    with pytest.raises(FormatError, match=r"input_blocks\.0\.0\.weight is \[320, 8, 3, 3\], expected \[320, 4, 3, 3\]"):
        detect_architecture(shapes)


def test_garbage_keys_raise_a_clear_format_error():
    with pytest.raises(FormatError) as info:
        detect_architecture({"foo.weight": (3, 3), "bar": (1,)})
    message = str(info.value)
    assert "looks like no supported architecture" in message
    assert "sd1, sd2, sdxl" in message and "bar, foo.weight" in message


def test_a_lora_file_is_not_a_checkpoint():
    with pytest.raises(FormatError, match="looks like no supported architecture"):
        detect_architecture({"lora_unet_conv_in.lora_down.weight": (4, 4, 3, 3), "lora_unet_conv_in.alpha": ()})


def test_wrong_shape_names_the_key_and_the_closest_architecture():
    shapes = shapes_of("sd1")
    key = UNET + "middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    shapes[key] = (1280, 999)
    with pytest.raises(FormatError) as info:
        detect_architecture(shapes)
    message = str(info.value)
    assert "closest is sd1 (full)" in message and key in message and "[1280, 999]" in message


def test_missing_unet_key_is_named():
    shapes = shapes_of("sdxl")
    del shapes[UNET + "out.2.weight"]
    with pytest.raises(FormatError, match=r"closest is sdxl \(full\).*out\.2\.weight is absent"):
        detect_architecture(shapes)


def test_empty_file():
    with pytest.raises(FormatError, match="no tensors at all"):
        detect_architecture({})


def test_detection_is_fast_for_sdxl():
    shapes = shapes_of("sdxl")
    detect_architecture(shapes)  # builds the candidate tables once
    start = time.perf_counter()
    for _ in range(5):
        detect_architecture(shapes)
    assert (time.perf_counter() - start) / 5 < 0.2


def test_shapes_given_as_lists_work():
    shapes = {k: list(v) for k, v in shapes_of("sd2", "tiny").items()}
    assert detect_architecture(shapes).architecture is tiny_architecture("sd2")


def test_a_consistently_scaled_sd1_is_detected_with_its_dimensions():
    # SD 1.5's key names at channel counts no preset has: model channels 24, context 40.
    dims = {"model_channels": 24, "context": 40, "vocab": 100, "vae_channels": 12}
    shapes = {t.key: t.shape for t in get_architecture("sd1", dims).tensors}
    detection = detect_architecture(shapes)
    arch = detection.architecture
    assert (arch.name, arch.size) == ("sd1", "scaled")
    assert dict(arch.dimensions) == dims
    assert arch.size_text == "scaled: model channels 24, context 40, vocab 100, vae channels 12"
    assert arch is get_architecture("sd1", dims)
    assert (detection.missing, detection.extra) == ((), ())


@pytest.mark.parametrize("name", SD_NAMES)
def test_dimensions_are_read_from_the_unet_alone(name):
    full = dict(get_architecture(name).dimensions)
    dims = {"model_channels": 8, "context": 40 if name != "sdxl" else 48}
    shapes = {t.key: t.shape for t in get_architecture(name, dims).tensors if t.component == "unet"}
    if name == "sdxl":
        dims["adm_in_channels"] = full["adm_in_channels"]  # label_emb is part of the UNet: read there
    detection = detect_architecture(shapes)
    assert detection.architecture.name == name
    assert {k: v for k, v in detection.architecture.dimensions if k in dims} == dims


def test_one_tensor_of_another_width_is_refused_in_a_scaled_model():
    dims = {"model_channels": 24, "context": 40}
    shapes = {t.key: t.shape for t in get_architecture("sd1", dims).tensors}
    key = UNET + "output_blocks.5.1.transformer_blocks.0.attn2.to_v.weight"
    shapes[key] = (shapes[key][0], 41)
    with pytest.raises(FormatError) as info:
        detect_architecture(shapes)
    message = str(info.value)
    assert "closest is sd1 (scaled: model channels 24, context 40" in message and key in message


def test_a_scaled_sd1_inpaint_conv_in():
    shapes = {t.key: t.shape for t in get_architecture("sd1", {"model_channels": 24, "context": 40}).tensors}
    shapes[UNET + "input_blocks.0.0.weight"] = (24, 9, 3, 3)
    detection = detect_architecture(shapes)
    assert detection.inpaint is True and dict(detection.architecture.dimensions)["model_channels"] == 24
