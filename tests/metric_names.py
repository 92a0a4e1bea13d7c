"""What stsmilter exports, as Prometheus sees it: shared by the docs and contrib tests."""

from prometheus_client.metrics import MetricWrapperBase

from stsmilter import metrics

_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("", "_bucket", "_sum", "_count", "_created")}


def metric_objects():
    return [obj for obj in vars(metrics).values() if isinstance(obj, MetricWrapperBase)]


def documented_name(metric) -> str:
    """The name an operator queries: counters get _total, histograms keep the base name."""
    return metric._name + "_total" if metric._type == "counter" else metric._name


def exposed_names():
    """Every series name Prometheus can see for our metrics, plus histogram base names."""
    return {m._name + suffix for m in metric_objects() for suffix in _SUFFIXES.get(m._type, ("",))}


def base_name(series: str) -> str:
    for m in metric_objects():
        if series in {m._name + suffix for suffix in _SUFFIXES.get(m._type, ("",))}:
            return m._name
    raise AssertionError(f"{series} is not a series of an stsmilter metric")
