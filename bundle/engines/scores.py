"""Score functions for Ignite handlers (early stopping, model selection)."""

from ignite.engine import Engine

__all__ = ["key_metric_score"]


def key_metric_score(engine: Engine) -> float:
    """The evaluator's current key metric (higher is better for every key metric the configs use)."""
    return float(engine.state.metrics[engine.state.key_metric_name])
