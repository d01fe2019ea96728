"""'conv': the 2017 post's head on spatial maps: Conv2D(100, 2), dropout 0.4, global average pooling, dropout 0.3,
softmax, trained with RMSprop."""

from __future__ import annotations

from cifar_transfer.heads.network import Network
from cifar_transfer.native import load_keras


def layers(features, feature_shape: list[int], moments: None):
    keras = load_keras()

    height, width = feature_shape[0], feature_shape[1]
    maps = keras.layers.Reshape(tuple(feature_shape))(features)
    maps = keras.layers.Conv2D(100, kernel_size=min(2, height, width))(maps)
    maps = keras.layers.Dropout(0.4)(maps)
    pooled = keras.layers.GlobalAveragePooling2D()(maps)
    return keras.layers.Dropout(0.3)(pooled)


NETWORK = Network("conv", layers=layers, optimizer="RMSprop", standardized=False)
TRAINER = NETWORK.trainer
