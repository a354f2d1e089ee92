"""fedpeft: federated parameter-efficient fine-tuning for hospitals."""

__version__ = "0.1.0"
