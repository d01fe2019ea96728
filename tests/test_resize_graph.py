"""The converted backbone's bilinear resize as matrix products: what OpenVINO's Interpolate and TensorFlow compute."""

from __future__ import annotations

import numpy as np
import pytest

from cifar_transfer.resize_graph import RESIZE_NODES, interpolation_matrix, resize_as_matmuls


def resize_model(source: tuple[int, int], target: tuple[int, int], **attributes):
    import openvino as ov
    import openvino.opset11 as ops

    images = ops.parameter([-1, *source, 3], np.float32, name="images")
    options = {"mode": "linear_onnx", "coordinate_transformation_mode": "half_pixel", "antialias": False} | attributes
    resized = ops.interpolate(
        images,
        ops.constant(np.array(target, np.int64)),
        options["mode"],
        "sizes",
        coordinate_transformation_mode=options["coordinate_transformation_mode"],
        antialias=options["antialias"],
        axes=ops.constant(np.array([1, 2], np.int64)),
    )
    return ov.Model([ops.relu(resized)], [images])


def run(model, images: np.ndarray) -> np.ndarray:
    import openvino as ov

    return ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(images)[0]


def types(model) -> list[str]:
    return [node.get_type_name() for node in model.get_ordered_ops()]


@pytest.mark.parametrize("source,target", [((32, 32), (139, 139)), ((32, 32), (75, 75)), ((32, 32), (17, 17)), ((13, 29), (40, 11))])
def test_the_products_compute_what_interpolate_and_tensorflow_compute(source, target):
    import tensorflow as tf

    images = np.random.default_rng(0).integers(0, 256, (5, *source, 3)).astype(np.float32)
    rewritten = resize_as_matmuls(resize_model(source, target))
    assert "Interpolate" not in types(rewritten) and types(rewritten).count("MatMul") == 2
    assert sorted(node.get_friendly_name() for node in rewritten.get_ordered_ops() if node.get_type_name() == "MatMul") == [
        f"{RESIZE_NODES}0/columns",
        f"{RESIZE_NODES}0/rows",
    ]
    products = run(rewritten, images)
    assert products.shape == (5, *target, 3)
    np.testing.assert_allclose(products, run(resize_model(source, target), images), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(products, tf.nn.relu(tf.image.resize(images, target)).numpy(), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("attributes", [{"antialias": True}, {"mode": "cubic"}, {"coordinate_transformation_mode": "align_corners"}])
def test_a_resize_the_products_would_not_compute_exactly_is_left_alone(attributes):
    model = resize_model((32, 32), (75, 75), **attributes)
    assert "Interpolate" in types(resize_as_matmuls(model)) and "MatMul" not in types(model)


def test_each_output_pixel_blends_at_most_two_input_pixels_with_weights_summing_to_one():
    weights = interpolation_matrix(32, 139)
    assert weights.shape == (139, 32) and ((weights > 0).sum(axis=1) <= 2).all()
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-6)
    assert weights[0, 0] == 1.0 and weights[-1, -1] == 1.0  # the edges are clamped, not blended with the outside


@pytest.mark.slow
def test_an_int8_backbone_resizes_in_float_and_quantizes_the_rest(tmp_path):
    from cifar_transfer.config import load_config
    from cifar_transfer.extractors import openvino_model

    images = np.random.default_rng(1).integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    config = load_config(source="x", md5="none", backbone="MobileNetV2", weights="none", input_size=48, storage=str(tmp_path))
    model, made_from = openvino_model(config.feature_spec("a" * 32, "openvino", "int8"), (32, 32, 3), None, calibration=lambda: images)
    assert "FakeQuantize" not in types(made_from), "the float model it was made from (the precision check's reference) is left as it was"
    nodes = list(model.get_ordered_ops())
    resize = [node for node in nodes if node.get_friendly_name().startswith(RESIZE_NODES) and node.get_type_name() == "MatMul"]
    assert len(resize) == 2 and "Interpolate" not in types(model)
    assert sum(node.get_type_name() == "FakeQuantize" for node in nodes) >= 30, "the backbone is quantized"
    feeding = {port.get_source_output().get_node().get_type_name() for node in resize for port in node.inputs()}
    assert "FakeQuantize" not in feeding, feeding


@pytest.mark.slow
@pytest.mark.parametrize("precision,products", [("float32", True), ("bfloat16", False)])
def test_float32_resizes_by_products_and_bf16_by_openvinos_resize(precision, products, tmp_path):
    """bf16 would run the products in bf16, rounding the blend three times."""
    from cifar_transfer.config import load_config
    from cifar_transfer.extractors import openvino_model

    config = load_config(source="x", md5="none", backbone="MobileNetV2", weights="none", input_size=48, storage=str(tmp_path))
    model, _ = openvino_model(config.feature_spec("a" * 32, "openvino", precision), (32, 32, 3), None)
    assert ("Interpolate" not in types(model)) == products and (types(model).count("MatMul") >= 2) == products
