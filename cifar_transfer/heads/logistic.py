"""'logistic': the standardized features (maps averaged over height and width) into a softmax, trained with Adam."""

from __future__ import annotations

from cifar_transfer.heads.network import Network, NetworkDetails, standardized


class LogisticDetails(NetworkDetails):
    C: float | None = None  # heads trained before ridge replaced this path (53941bb): scikit-learn's chosen inverse strength

    def choice(self) -> str:
        return f"C={self.C:g}" if self.C is not None else super().choice()


NETWORK = Network("logistic", layers=standardized, details=LogisticDetails)
TRAINER = NETWORK.trainer
