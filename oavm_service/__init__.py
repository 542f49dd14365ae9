"""OAVM service: the model, the streaming engine, the ZeroMQ service, farm batch, training and evaluation."""
__version__ = "0.1.0"
