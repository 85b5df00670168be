"""Where replicas run: joining or starting a Ray cluster, checking and reserving resources,
and setting up torch.distributed among replica actors the way Ray Train does (rank 0 publishes
its address and a free port; every rank joins with a TCP init method)."""
from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass

from ray_train.errors import ResourceError, UserError

PLACEMENT_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class ReplicaContext:
    """Explicit per-replica context, passed to every replica: no hidden globals."""

    rank: int
    world_size: int
    num_cpus: float
    num_gpus: float
    seed: int


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES, TRIM_THRESHOLD_BYTES = 64 * 2**20, 512 * 2**20


def tune_malloc() -> bool:
    """Keep freed tensor memory in this process instead of handing it back to the OS.

    A training step allocates and frees the same few-MB activation and gradient buffers over and
    over. glibc serves blocks above its mmap threshold (128 KB until the process happens to free
    a larger one) with fresh mmaps, and trims the heap top past its trim threshold, so depending
    on the allocation history every step may page-fault its buffers back in: net B, batch 64,
    showed anywhere from 0 to 1,700 minor faults per step untuned (1,068 faults and 3,833
    samples/s against 0 and 4,544 in one side-by-side pair), and 0-30 with both thresholds raised.
    Replicas and parameter shards call this first thing. A no-op (False) where libc is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


def init_ray(num_cpus: int | None = None, preload: tuple[str, ...] = (), address: str | None = None,
             verbose: bool = False) -> str:
    """Join or start the cluster ``address`` names (``resolve_address``) and return one line
    saying which cluster this process is on and why.

    A local cluster runs without the dashboard: on a 2-core machine its processes take CPU
    from the replicas (docs/benchmarks.md). ``preload`` names modules (torch and what imports it) to
    import in a background thread meanwhile: ray.init spends most of its seconds waiting for the
    processes it starts, and the driver's imports fill that time (about 1 s sooner to the first
    step on the development VM). Ray's own output goes to ray_train.raylog (the run's ray.log),
    and to the terminal as well with ``verbose``."""
    import ray

    from ray_train import raylog

    if ray.is_initialized():
        raylog.capture_loggers(verbose)
        raylog.capture_forwarded(owned=False)
        return f"cluster: the Ray cluster this process is on already, {_size()} (ray.init was called before this run)"
    target, why = resolve_address(address)
    raylog.capture_loggers(verbose)
    # Ray Data's INFO lines and progress notices are no output the user asked for; the processes
    # a local cluster starts (replicas, Ray Data's split coordinators) inherit this environment.
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")
    importing_meanwhile(preload, lambda: _start_or_join(target, num_cpus))
    raylog.capture_forwarded()
    if target == "local":
        line = f"cluster: started a local Ray cluster of its own, {_size()} ({why})"
    else:
        line = f"cluster: joined the Ray cluster at {ray.get_runtime_context().gcs_address}, {_size()} ({why})"
    raylog.note(line)
    return line


ADDRESS_HELP = ("the Ray cluster to run on: local (a cluster of its own, started for this run), auto (the cluster "
                "`ray start` left on this machine, or RAY_ADDRESS) or HOST:PORT (default: RAY_ADDRESS if set, as "
                "under `ray job submit`, else local)")


def resolve_address(address: str | None) -> tuple[str, str]:
    """(what to hand ray.init, why): --address, else RAY_ADDRESS, else a local cluster of its own,
    never the newest one `ray start` left on this machine (Ray's default without an address)."""
    if address is not None:
        address = address.strip()
        if address not in ("local", "auto") and not _host_port(address):
            raise UserError(f"--address: expected local, auto or HOST:PORT, got {address!r}")
        return address, f"--address {address}"
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if env:
        return env, f"RAY_ADDRESS={env}"
    return "local", "no --address given and RAY_ADDRESS unset"


def _host_port(address: str) -> bool:
    host, _, port = address.rpartition(":")
    return bool(host) and port.isdigit() or address.startswith("ray://")


def _size() -> str:
    import ray

    total = ray.cluster_resources()
    gpus = total.get("GPU", 0.0)
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    cpus = total.get("CPU", 0.0)
    return (f"{nodes} node{'s' if nodes != 1 else ''}, {cpus:g} CPU{'s' if cpus != 1 else ''}"
            + (f", {gpus:g} GPU{'s' if gpus != 1 else ''}" if gpus else ""))


def local_resources(address: str | None, num_cpus: int | None = None) -> dict | None:
    """What the local cluster this process would start holds, known before starting it (so that
    an impossible run fails in a second, not after Ray's start-up): CPUs as Ray counts them, GPUs
    from the driver's device list without initialising CUDA. None when Ray is running already or
    the run joins another cluster, which only ray.cluster_resources knows."""
    import sys

    target = resolve_address(address)[0]  # a bad --address is a user error before anything else
    ray = sys.modules.get("ray")
    if target != "local" or (ray is not None and ray.is_initialized()):
        return None
    gpus = _gpu_count()  # None: not known here (Ray's own check after its start still applies)
    return {"CPU": float(num_cpus if num_cpus is not None else _cpu_count()),
            **({"GPU": float(gpus)} if gpus is not None else {})}


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _gpu_count() -> int | None:
    """NVIDIA GPUs this process may use, as Ray would count them: CUDA_VISIBLE_DEVICES if set, else
    the driver's /proc listing (no CUDA context, no nvidia-smi); 0 on a machine without the NVIDIA
    driver, None where the driver is loaded but lists nothing readable here."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    if not os.path.exists("/proc/driver/nvidia"):
        return 0 if not os.path.exists("/dev/nvidiactl") else None
    try:
        return len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return None


def importing_meanwhile(modules: tuple[str, ...], work) -> None:
    """Run ``work()`` while a background thread imports ``modules``; an import error is raised
    here, after ``work`` is done."""
    import importlib
    import threading

    failed: list[BaseException] = []

    def load() -> None:
        try:
            for name in modules:
                importlib.import_module(name)
        except BaseException as exc:
            failed.append(exc)

    loader = threading.Thread(target=load, name="preload", daemon=True)
    loader.start()
    try:
        work()
    finally:
        loader.join()
    if failed:
        raise failed[0]


# Ray's periodic background work that a run's own one-node cluster does not use, turned down before
# it starts (the processes it starts inherit the environment; a value already set is kept): the
# autoscaler monitor's update (a fixed local cluster never scales), the dashboard agent's
# per-process stats (psutil over every process every 5 s) and the core workers' metrics export.
# Measured over a CLI run's training on 2 cores: Ray's daemons took 0.22 CPU s per replica CPU s
# with Ray's defaults, 0.15 with these (docs/benchmarks.md, scripts/profile_cli.py).
QUIET_LOCAL_CLUSTER = {
    "AUTOSCALER_UPDATE_INTERVAL_S": "60",
    "REPORTER_UPDATE_INTERVAL_MS": "60000",
    "RAY_enable_metrics_collection": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def _start_or_join(address: str, num_cpus: int | None) -> None:
    import ray

    # Actors import ray_train and models from the installed package (pip install ., which make
    # does as an editable install) or from the job's working_dir under ``ray job submit``; a local
    # cluster's workers run this Python with this environment. Ray's loggers write where
    # ray_train.raylog put them (configure_logging=False would drop every handler).
    if address != "local":
        try:
            ray.init(address=address, log_to_driver=True)
        except ConnectionError as exc:
            auth = "" if os.environ.get("RAY_AUTH_MODE") else (
                "; a cluster with token authentication (Ray's default) needs RAY_AUTH_MODE=token and its token "
                "(~/.ray/auth_token, RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH)")
            raise UserError(f"cluster: cannot join the Ray cluster at {address}: {str(exc).splitlines()[0]}{auth}"
                            ) from None
        return
    for name, value in QUIET_LOCAL_CLUSTER.items():
        os.environ.setdefault(name, value)
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)


def check_resources(res, count: int | None = None, shards: int = 0, shard_cpus: float = 0.0,
                    total: dict | None = None, stages: int = 1) -> None:
    """Fail fast, naming what is asked and what the cluster has, instead of hanging on placement;
    ``shards`` parameter-server shards of ``shard_cpus`` each come on top of the replicas, and a
    replica of ``stages`` stage actors asks for ``stages`` times a replica's resources.
    ``total``: the resources of the local cluster about to start (``local_resources``), checked
    before Ray starts; else the running cluster's."""
    where = "this machine has" if total is not None else "the cluster has"
    if total is None:
        import ray

        total = ray.cluster_resources()
    least = count is None and res.elastic  # an elastic count needs room for its MIN only
    count = (res.fewest if count is None else count) * stages
    extra = shards * shard_cpus
    asks = {"CPU": count * res.cpus_per_replica + extra, "GPU": count * res.gpus_per_replica}
    for kind, asked in asks.items():
        if kind not in total and where == "this machine has":
            continue  # not known before Ray starts: Ray's own count decides
        have = total.get(kind, 0.0)
        if asked > have + 1e-9:
            per = res.cpus_per_replica if kind == "CPU" else res.gpus_per_replica
            plus = f" + {shards} shards x {shard_cpus:g} CPU" if kind == "CPU" and extra else ""
            who = f"{count // stages} replicas x {stages} stages" if stages > 1 else f"{count} replicas"
            if least:
                who += f" (the MIN of --replicas {res.fewest}-{res.replicas})"
            raise ResourceError(
                f"resources: {who} x {per:g} {kind}{plus} = {asked:g} {kind} asked, but {where} "
                f"{have:g} {kind} in all; lower --replicas"
                + (", --stages" if stages > 1 else "") + f" or --{kind.lower()}s-per-replica"
                + (" or --ps-shards" if plus else "")
            )


def concurrent_slots(res, count: int, stages: int = 1) -> int:
    """How many member groups fit in the cluster at once (at least one: check_resources said so);
    inside a Ray Tune trial, in the trial's placement group (whose bundles hold one group)."""
    import ray

    if trial_placement_group() is not None:
        return 1
    total = ray.cluster_resources()
    actors = res.replicas * stages
    fit = [math.floor(total.get("CPU", 0.0) / (actors * res.cpus_per_replica) + 1e-9)]
    if res.gpus_per_replica:
        fit.append(math.floor(total.get("GPU", 0.0) / (actors * res.gpus_per_replica) + 1e-9))
    return max(1, min(count, *fit))


def reserve(res, count: int | None = None):
    """A placement group with one bundle per replica, ready or a ResourceError within the timeout;
    inside a Ray Tune trial, the trial's own group. Give it back with ``release``."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    count = res.replicas if count is None else count
    check_resources(res, count)
    bundle = {"CPU": res.cpus_per_replica}
    if res.gpus_per_replica:
        bundle["GPU"] = res.gpus_per_replica
    trial = trial_placement_group()
    if trial is not None:
        return _borrow(trial, bundle, count)
    pg = placement_group([dict(bundle) for _ in range(count)], strategy=res.placement)
    ready, _ = ray.wait([pg.ready()], timeout=PLACEMENT_TIMEOUT_S)
    if not ready:
        remove_placement_group(pg)
        raise ResourceError(
            f"resources: could not place {count} replicas of {bundle} with strategy {res.placement} within "
            f"{PLACEMENT_TIMEOUT_S:.0f} s; available now: {ray.available_resources()}"
        )
    return pg


def room_for(res, stages: int = 1, in_all: bool = False) -> int:
    """How many more replicas of ``stages`` actors the cluster's free resources hold now (or its
    live nodes' resources in all, ``in_all``), by the sums Ray gives (a cheap first guess: a free
    CPU split over two nodes counts; ``placeable`` says for sure)."""
    import ray

    free = ray.cluster_resources() if in_all else ray.available_resources()
    fits = [math.floor(free.get("CPU", 0.0) / (stages * res.cpus_per_replica) + 1e-9)]
    if res.gpus_per_replica:
        fits.append(math.floor(free.get("GPU", 0.0) / (stages * res.gpus_per_replica) + 1e-9))
    return max(0, min(fits))


def placeable(res, count: int, timeout_s: float) -> bool:
    """Whether ``count`` replica bundles can be placed (res.placement) within ``timeout_s``: a
    placement group is made and given back at once."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    bundle = {"CPU": res.cpus_per_replica, **({"GPU": res.gpus_per_replica} if res.gpus_per_replica else {})}
    pg = placement_group([dict(bundle) for _ in range(count)], strategy=res.placement)
    try:
        ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
        return bool(ready)
    finally:
        remove_placement_group(pg)


def trial_placement_group():
    """The placement group of the Ray Tune trial this process runs in (python -m ray_train search),
    or None. Tune schedules a trial's function in its group with placement_group_capture_child_tasks:
    the replicas must go into that group's bundles, as a group of their own would wait for
    resources the trial already holds."""
    import ray
    from ray.util.placement_group import get_current_placement_group

    if not ray.is_initialized():
        return None
    return get_current_placement_group()


def _borrow(pg, bundle: dict, count: int):
    """The trial's placement group for ``count`` replicas of ``bundle``: bundle r holds replica r
    (search.trial_bundles made it so); a ResourceError when it cannot."""
    specs = pg.bundle_specs
    fits = len(specs) >= count and all(specs[r].get(k, 0.0) + 1e-9 >= v
                                       for r in range(count) for k, v in bundle.items())
    if not fits:
        raise ResourceError(f"resources: {count} replicas of {bundle} do not fit this Ray Tune trial's placement "
                            f"group {specs}")
    return pg


def release(pg) -> None:
    """Remove a placement group ``reserve`` made; a borrowed trial group stays (removing it would
    kill the trial itself: Tune removes it when the trial ends)."""
    from ray.util.placement_group import remove_placement_group

    trial = trial_placement_group()
    if trial is not None and trial.id == pg.id:
        return
    remove_placement_group(pg)


def actor_class(cls, *, num_cpus: float, num_gpus: float = 0.0, pg=None, bundle: int | None = None,
                max_restarts: int = 0, max_concurrency: int | None = None):
    """The one factory that makes a plain class (Replica, ParameterShard, StalenessGate) a Ray actor
    class with its resources, placement and restart policy; tests call the plain classes directly
    or subclass them to inject faults. Restartable actors must get their large initial values by a method call, not as
    constructor arguments: Ray would keep those in the object store for the restarts."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    options = {"num_cpus": num_cpus, "num_gpus": num_gpus, "max_restarts": max_restarts}
    if max_concurrency is not None:
        options["max_concurrency"] = max_concurrency
    if pg is not None:
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=bundle)
    return ray.remote(cls).options(**options)


def retried(method):
    """An idempotent actor call that Ray resubmits until a restarting actor is back (it still
    fails, with ActorDiedError, once the actor's restarts are used up)."""
    return method.options(max_task_retries=-1)


def first_ready(urgent, rest):
    """One ready ref, from ``urgent`` when any of them is ready (a restarted replica's setup call
    before chunk results): ray.wait's ready list follows no order, so behind short chunks that are
    always ready, a replica's rejoin could wait for the end of the run."""
    import ray

    if urgent:
        ready, _ = ray.wait(list(urgent), num_returns=1, timeout=0)
        if ready:
            return ready[0]
    return ray.wait([*urgent, *rest], num_returns=1)[0][0]


def factory_failure(exc: BaseException):
    """The ModelFactoryError (ray_train.worker.replica.build_network) that killed an actor in its
    constructor, rebuilt from the death Ray reports (which carries the error as text only), or None."""
    from ray.exceptions import RayActorError

    from ray_train.errors import ModelFactoryError

    if not isinstance(exc, RayActorError):
        return None
    mark = f"{ModelFactoryError.__name__}: "
    lines = [ln.split(mark, 1)[1].strip() for ln in str(exc).splitlines() if mark in ln]
    return ModelFactoryError(lines[-1]) if lines else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_address() -> str:
    import ray

    return ray.util.get_node_ip_address()
