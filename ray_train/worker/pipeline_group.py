"""The driver's handle on R pipelined replicas of S stage actors each (ray_train/worker/pipeline.py):
started in one placement group, joined in one gloo process group (point-to-point between a
replica's neighbouring stages, one averaging group per stage), driven a chunk of steps at a time
like a ReplicaGroup. The driver only starts chunks and collects metrics: activations and gradients
never pass through it. A strategy composes it (strategies/sync/engine.py)."""
from __future__ import annotations


from ray_train.cluster import actor_class, reserve
from ray_train.config import TrainConfig
from ray_train.run.failure import ReplicaDied
from ray_train.worker.evaluation import EvalResult, combine
from ray_train.worker.group import ReplicaGroup
from ray_train.worker.pipeline import Stage, StageContext


class StageMetrics:
    """Stage actors' per-step figures (results with ``stage``, ``step_ms``, ``wait_ms`` and
    ``act_bytes``), gathered until ``report`` writes them as TensorBoard tags per stage, averaged
    over the replicas and the steps: its step time, its idle share (time waiting for a neighbour
    over its step time: the bubble) and the activation and gradient bytes it sent to its
    neighbours per step. ``bubble`` is that share over the whole run. Sync reports every chunk,
    async (Downpour) every epoch."""

    def __init__(self, stages: int) -> None:
        self.stages = stages
        self.pending: list[dict] = []
        self.waited = self.busy = 0.0  # stage actors' milliseconds waiting for a neighbour, stepping

    def add(self, results: list[dict]) -> None:
        self.pending += results
        self.waited += sum(float(r["wait_ms"].sum()) for r in results)
        self.busy += sum(float(r["step_ms"].sum()) for r in results)

    def report(self, sink, step: int) -> None:
        for s in range(self.stages):
            mine = [r for r in self.pending if r["stage"] == s]
            steps = sum(len(r["step_ms"]) for r in mine)
            if not steps:
                continue
            step_ms = sum(float(r["step_ms"].sum()) for r in mine) / steps
            wait_ms = sum(float(r["wait_ms"].sum()) for r in mine) / steps
            sink.scalar(f"pipeline/step_ms/stage_{s}", step_ms, step)
            sink.scalar(f"pipeline/bubble/stage_{s}", wait_ms / step_ms if step_ms else 0.0, step)
            sink.scalar(f"pipeline/activation_bytes/stage_{s}", sum(r["act_bytes"] for r in mine) / steps, step)
        self.pending = []

    def bubble(self) -> float | None:
        """The share of the stage actors' step time spent waiting for a neighbour, so far."""
        return self.waited / self.busy if self.busy else None


class PipelineGroup(ReplicaGroup):
    """``actors`` in rank order: replica 0's stages 0..S-1, then replica 1's, ..."""

    def __init__(self, actors: list, pg, info: list[dict], comm: str, stages: int) -> None:
        super().__init__(actors, pg, info, comm)
        self.stages = stages
        self.metrics = StageMetrics(stages)

    @classmethod
    def create(cls, cfg: TrainConfig, data_ref, model, stage_cls=Stage) -> "PipelineGroup":
        import ray

        res, stages = cfg.resources, cfg.pipeline.stages
        pg = reserve(res, count=res.replicas * stages)
        actors = [
            actor_class(stage_cls, num_cpus=res.cpus_per_replica, pg=pg, bundle=r * stages + s).remote(
                StageContext(r, res.replicas, s, stages, res.cpus_per_replica, cfg.run.seed), cfg, data_ref, model)
            for r in range(res.replicas) for s in range(stages)
        ]
        group = cls(actors, pg, [], "none", stages)
        try:
            group.info = group.get([a.info.remote() for a in actors])
            port = ray.get(actors[0].free_port.remote())
            address = group.info[0]["address"]
            group.comm = group.get([a.connect.remote(address, port) for a in actors])[0]
        except Exception:
            group.shutdown(graceful=False)
            raise
        return group

    def report(self, results: list[dict], sink, step: int) -> None:
        """One chunk's per-stage TensorBoard tags (StageMetrics); adds to the run's bubble."""
        self.metrics.add(results)
        self.metrics.report(sink, step)

    def bubble(self) -> float | None:
        return self.metrics.bubble()

    def replica(self, r: int) -> list:
        return self.actors[r * self.stages : (r + 1) * self.stages]

    def evaluate(self, split: str, y) -> EvalResult:
        return combine([p for p in self.get([a.evaluate.remote(split) for a in self.actors]) if p is not None], y)

    def _died(self, exc) -> ReplicaDied:
        rank = self.rank_of(exc)
        where = {} if rank is None else {"rank": rank // self.stages, "stage": rank % self.stages,
                                         "pid": self.info[rank]["pid"] if self.info else None}
        return ReplicaDied({"rank": None, "pid": None, **where, "error": type(exc).__name__})

    def model_state(self) -> dict:
        """The whole network (replica 0's stages' parts together): what model.pt holds."""
        parts = self.get([a.state.remote() for a in self.replica(0)])
        return {"model": {k: v for p in parts for k, v in p["model"].items()}}

    def weights(self) -> dict:
        return {k: v for w in self.get([a.weights.remote() for a in self.replica(0)]) for k, v in w.items()}

    def state(self) -> dict:
        """The whole network, each stage's optimizer state (identical across replicas: replica
        0's), and every stage actor's RNG state, in rank order."""
        parts = self.get([a.state.remote() for a in self.replica(0)])
        rngs = self.get([a.rng_state.remote() for a in self.actors])
        return {"model": {k: v for p in parts for k, v in p["model"].items()},
                "stage_optimizers": [p["optimizer"] for p in parts], "stages": self.stages, "rng": rngs}

    def load_state(self, state: dict) -> None:
        import ray

        if state.get("stages") != self.stages:
            raise ValueError(f"the checkpoint holds {state.get('stages') or 1} stage(s) per replica, this run "
                             f"has --stages {self.stages}")
        per_stage = [ray.put({"model": state["model"], "optimizer": opt}) for opt in state["stage_optimizers"]]
        rngs = list(state.get("rng") or [])
        self.get([a.load_state.remote(per_stage[i % self.stages], rngs[i] if i < len(rngs) else None)
                  for i, a in enumerate(self.actors)])
