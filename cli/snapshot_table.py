"""One line per snapshot, as `moectl snapshots` and `kubectl moe snapshots` print them (imports nothing heavy:
the kubectl plugin starts without torch or gRPC)."""


def describe(step: int, experts: int, size: int, trainer_state: bool, path: str) -> str:
    trainer = "+ trainer state" if trainer_state else "experts only"
    return f"step {step:<8} {experts:>5} experts {size / 1e6:>10.1f} MB  {trainer:<15} {path}"
