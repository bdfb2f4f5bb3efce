"""The Prometheus metrics of one server, in their own registry (`GET /metrics`)."""

from collections import deque


class ServingMetrics:
    """The Prometheus metrics of one server, in their own registry."""

    LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)

    def __init__(self, num_layers: int):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "fastbert_requests", "Predict requests answered, by HTTP status", ["status"], registry=registry
        )
        self.errors = Counter(
            "fastbert_errors", "Predict requests refused or failed, by type", ["type"], registry=registry
        )
        self.inputs = Counter("fastbert_inputs", "Inputs classified", registry=registry)
        self.latency = Histogram(
            "fastbert_request_duration_seconds",
            "Predict request latency inside the server",
            buckets=self.LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_time = Histogram(
            "fastbert_queue_duration_seconds",
            "Time an input waited for its batch",
            buckets=self.LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_time = Histogram(
            "fastbert_batch_duration_seconds",
            "Forward time of a batch",
            buckets=self.LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "fastbert_batch_size",
            "Inputs per batch",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=registry,
        )
        self.exit_layer = Histogram(
            "fastbert_exit_layer",
            "Layer each input exited at (sum / count = mean exit layer)",
            buckets=tuple(range(1, num_layers + 1)),
            registry=registry,
        )
        self.mean_exit_layer = Gauge(
            "fastbert_mean_exit_layer", "Mean exit layer of the last 1000 inputs", registry=registry
        )
        self.speed = Gauge("fastbert_speed", "Speed served to requests that do not give one", registry=registry)
        self.queue_size = Gauge("fastbert_queue_size", "Inputs waiting for a batch", registry=registry)
        self.in_flight = Gauge("fastbert_requests_in_flight", "Predict requests in progress", registry=registry)
        self.speed_changes = Counter(
            "fastbert_speed_changes", "Speed changes made by the adaptive controller", registry=registry
        )
        self._recent_exits: deque[int] = deque(maxlen=1000)

    def record_batch(self, size, exit_layers, queue_times, seconds):
        self.batch_size.observe(size)
        self.batch_time.observe(seconds)
        self.inputs.inc(size)
        for layer, waited in zip(exit_layers, queue_times, strict=True):
            self.exit_layer.observe(layer)
            self.queue_time.observe(waited)
        self._recent_exits.extend(exit_layers)
        self.mean_exit_layer.set(sum(self._recent_exits) / len(self._recent_exits))

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
