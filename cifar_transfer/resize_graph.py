"""The backbone's bilinear resize as two matrix products, in a converted OpenVINO model.

Why: the model resizes the stored 32 px images to the input size itself (`backbones.build_extractor`), and
OpenVINO's CPU `Interpolate` is slow at it on channels-last images with three channels: 19 ms of a 64-image
batch of int8 InceptionV3 at 139 px on one Xeon core, 10-20% of the pipeline's time. Bilinear resizing is
linear and separable: each output row is a fixed blend of two input rows and each output column of two input
columns, so an image channel resizes as `rows @ channel @ columns.T`, matrix products OpenVINO runs in its
fastest kernels. Measured on a 2-core Xeon with AMX: the int8 extractor 9-12% faster, MobileNetV2 at 64 px in
float32 (a small resize) unchanged within the noise. The features are float32's to rounding (3e-7 of their scale).
In bf16 or f16 the products would run in that precision, rounding the blend three times (MobileNetV2's bf16
features fell from a cosine of 0.996 to float32's to 0.983), so those keep OpenVINO's resize.

Only the resize Keras' `Resizing(interpolation="bilinear")` converts to is rewritten (ONNX-style linear, half-pixel
centres, no antialiasing, no padding, channels-last, a static input size); any other resize stays as it is. An
int8 backbone keeps the products in float (`RESIZE_NODES`, left out of quantization): the pixels' blend
weights are not 7-bit numbers.
"""

from __future__ import annotations

import numpy as np

RESIZE_NODES = "bilinear_resize/"  # the products' names start with this
PRODUCT_PRECISIONS = ("float32", "int8")  # where the products compute in float32 (int8 leaves them out of quantization)
_CHANNELS_FIRST, _CHANNELS_LAST = [0, 3, 1, 2], [0, 2, 3, 1]


def interpolation_matrix(source: int, target: int) -> np.ndarray:
    """(target, source) weights of half-pixel linear interpolation (TensorFlow's `half_pixel_centers`, ONNX's
    `half_pixel`), coordinates clamped to the edge pixels."""
    position = np.clip((np.arange(target) + 0.5) * (source / target) - 0.5, 0, source - 1)
    below = np.floor(position).astype(np.int64)
    above = np.minimum(below + 1, source - 1)
    fraction = position - below
    weights = np.zeros((target, source))
    np.add.at(weights, (np.arange(target), below), 1 - fraction)
    np.add.at(weights, (np.arange(target), above), fraction)
    return weights.astype(np.float32)


def resize_as_matmuls(model):
    """`model` (an `openvino.Model`, changed in place and returned) with each bilinear resize it can express exactly
    as matrix products rewritten so; a model without one is returned unchanged."""
    import openvino.opset11 as ops

    for number, node in enumerate(node for node in model.get_ordered_ops() if _rewritable(node)):
        image, sizes, _ = (port.get_source_output() for port in node.inputs())
        height, width = (image.get_partial_shape()[axis].get_length() for axis in (1, 2))
        target_height, target_width = (int(size) for size in sizes.get_node().get_vector())
        channels_first = ops.transpose(image, ops.constant(np.array(_CHANNELS_FIRST, np.int64)))
        rows = ops.matmul(ops.constant(interpolation_matrix(height, target_height)), channels_first, False, False)
        both = ops.matmul(rows, ops.constant(interpolation_matrix(width, target_width)), False, True)
        rows.set_friendly_name(f"{RESIZE_NODES}{number}/rows")
        both.set_friendly_name(f"{RESIZE_NODES}{number}/columns")
        resized = ops.transpose(both, ops.constant(np.array(_CHANNELS_LAST, np.int64)))
        for consumer in list(node.output(0).get_target_inputs()):
            consumer.replace_source_output(resized.output(0))
    model.validate_nodes_and_infer_types()
    return model


def _rewritable(node) -> bool:
    if node.get_type_name() != "Interpolate" or node.get_type_info().version_id != "opset11" or len(node.inputs()) != 3:
        return False
    image, sizes, axes = (port.get_source_output() for port in node.inputs())
    shape, attributes = image.get_partial_shape(), node.get_attributes()
    return (
        attributes["mode"] == "linear_onnx"
        and attributes["coordinate_transformation_mode"] == "half_pixel"
        and attributes["shape_calculation_mode"] == "sizes"
        and not attributes["antialias"]
        and not any([*attributes["pads_begin"], *attributes["pads_end"]])
        and shape.rank.is_static
        and shape.rank.get_length() == 4
        and shape[1].is_static
        and shape[2].is_static
        and sizes.get_node().get_type_name() == "Constant"
        and axes.get_node().get_type_name() == "Constant"
        and list(axes.get_node().get_vector()) == [1, 2]
    )
