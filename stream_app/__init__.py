"""stream_app: real-time behavioural customer segmentation on Kafka (Faust + River)."""

__version__ = "0.1.0"
